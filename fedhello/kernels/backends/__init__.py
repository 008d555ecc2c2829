"""The backends of ``multi_lora_linear``, one module per name users pass (see ``contract.py``).

This file holds no code: importing a submodule binds its name here, so ``torch`` and ``triton`` in
this namespace are the backend modules, not the packages of the same names.
"""
