"""One frozen Hugging Face backbone serving N clients: injection, routing, block masks, state.

``inject_multi_lora`` replaces the target linear layers of a ``transformers`` model (in place;
the backbone is never copied) by ``MultiLoRALinear`` banks and its trainable heads by
``ClientHeadBank`` s, and returns a ``MultiLoRAModel`` that wraps it::

    model = inject_multi_lora(hf_model, ["query", "value"], num_clients=8, rank=8, alpha=16)
    with model.route(client_ids):          # int [batch]: each sample's client slot, -1 = base model
        logits = model(**batch).logits
    model.set_trainable(mask)              # bool [L, N]: which blocks each client trains
    model.fisher_norms()                   # float32 [L, N]: sum of ||dA||^2 + ||dB||^2 per block
    opt = model.masked_optimizer("adamw", lr=1e-3, weight_decay=0.01)
    opt.step(model.step_masks(client_ids)) # after backward: frozen and unrouted slots stay put

"Block" l is the l-th transformer layer (see ``discovery``); every adapter inside it shares
``trainable[l, c]`` and its squared gradient norms add up into ``fisher_norms()[l, c]``.

A client's state is a plain dict: ``"<module>.lora_a"`` ``[r_max, d_in]``,
``"<module>.lora_b"`` ``[d_out, r_max]`` for every wrapped module, and ``"<head>.weight"`` /
``"<head>.bias"`` for every head, with module names as in the original model.
"""

from __future__ import annotations

import numbers
from contextlib import contextmanager
from typing import Iterable, Iterator, Mapping, Sequence

import torch
from torch import nn

from .discovery import BlockMap, find_blocks, is_linear_like, match_modules
from .heads import ClientHeadBank
from .lora_linear import MultiLoRALinear, check_ranks, check_settings
from .optim import MaskedAdamW, MaskedSGD, make_masked_optimizer
from .quantized import check_quantized_base, prepare_quantized_base, quantization_of
from .routing import RoutingContext, normalize_client_ids

__all__ = ["MultiLoRAModel", "inject_multi_lora", "AUTO_HEAD_NAMES", "COMPUTE_DTYPES", "DEFAULT_TARGET_MODULES"]

# Dtypes the frozen backbone may compute in (``MultiLoRAModel.set_compute_dtype``).
COMPUTE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# LoRA targets per architecture when a run names none: the attention query and value
# projections, as in the LoRA paper and the Fed-HeLLo code (q/v of ViT).
DEFAULT_TARGET_MODULES = {
    "bert": ["query", "value"],
    "mpnet": ["q", "v"],
    "vit": ["q_proj", "v_proj"],  # transformers 5 names (4.x: query, value)
    "llama": ["q_proj", "v_proj"],
    "gpt2": ["c_attn"],
}

# Names transformers gives the trainable heads of its classification models
# (BERT, ViT, RoBERTa: "classifier"; LLaMA, GPT-2, Mistral, Qwen: "score").
AUTO_HEAD_NAMES = ("classifier", "score")

# Keyword arguments whose first dimension is the batch, in the order they are looked at.
_BATCH_INPUTS = ("input_ids", "inputs_embeds", "pixel_values", "attention_mask", "input_values")


class MultiLoRAModel(nn.Module):
    """A ``transformers`` model whose target layers carry N client adapters and whose heads are per client.

    Built by ``inject_multi_lora``. Attribute lookups it does not know go to the wrapped model
    (``model.config``, ``model.generate``), and ``model(**batch)`` calls it; run forwards inside
    ``route``.

    Modes: ``train()`` puts the adapters and heads in training mode (LoRA dropout on). The
    backbone's own modules stay in eval mode unless ``backbone_train_mode`` was set: its
    dropout would draw from one generator for the whole batch, which couples the clients that
    share it and breaks the equality of batched and one-client-at-a-time training.
    """

    def __init__(
        self,
        backbone: nn.Module,
        context: RoutingContext,
        blocks: BlockMap,
        lora_names: Sequence[str],
        head_names: Sequence[str],
        *,
        max_rank: int,
        alpha: float,
        dropout: float,
        backbone_train_mode: bool = False,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.context = context
        self.blocks = blocks
        self.max_rank, self.alpha, self.dropout = max_rank, float(alpha), float(dropout)
        self.backbone_train_mode = backbone_train_mode
        # Plain lists (not ModuleLists): the modules are registered once, inside the backbone.
        self._lora = [(name, backbone.get_submodule(name)) for name in lora_names]
        self._heads = [(name, backbone.get_submodule(name)) for name in head_names]
        self._block_of = {name: blocks.block_of(name) for name in lora_names}
        self.register_buffer(
            "_trainable", torch.ones(blocks.num_blocks, context.num_clients, dtype=torch.bool), persistent=False
        )
        # The modules that transformers' gradient_checkpointing_enable can switch on (they carry the
        # flag from construction on): their training mode follows the flag at every forward.
        self._checkpointable = [m for m in backbone.modules() if hasattr(m, "gradient_checkpointing")]

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "backbone" or "backbone" not in self._modules:
                raise
            return getattr(self._modules["backbone"], name)

    def save_pretrained(self, *args, **kwargs) -> None:
        """Refused: the backbone's target layers are wrapped (their weights sit under ``...base``) and
        the banks hold N clients, so transformers would write a checkpoint that reloads with random
        target weights. One client's adapters: ``fedhello.nn.export_peft``."""
        raise RuntimeError("save_pretrained: a MultiLoRAModel holds N clients' adapters around wrapped layers; "
                           "save one client with fedhello.nn.export_peft(model, client, folder) (a PEFT adapter "
                           "folder for the original backbone)")

    push_to_hub = save_pretrained

    # ------------------------------------------------------------------ structure
    @property
    def num_clients(self) -> int:
        """N, the number of client slots."""
        return self.context.num_clients

    @property
    def num_blocks(self) -> int:
        """L, the number of transformer blocks."""
        return self.blocks.num_blocks

    @property
    def block_modules(self) -> dict[int, list[str]]:
        """Block index -> qualified names of the wrapped modules in it (every block 0..L-1 listed)."""
        out: dict[int, list[str]] = {b: [] for b in range(self.num_blocks)}
        for name, _ in self._lora:
            out[self._block_of[name]].append(name)
        return out

    @property
    def lora_modules(self) -> list[tuple[str, MultiLoRALinear]]:
        """``(qualified name, layer)`` of every wrapped linear layer, in model order."""
        return list(self._lora)

    @property
    def head_modules(self) -> list[tuple[str, ClientHeadBank]]:
        """``(qualified name, head bank)`` of every per-client head, in model order."""
        return list(self._heads)

    @property
    def ranks(self) -> list[int]:
        """Per-client LoRA ranks (N ints in ``[0, max_rank]``; 0: no adapter)."""
        return self._lora[0][1].ranks.tolist()

    def _device(self) -> torch.device:
        return self._lora[0][1].lora_a.device

    # ------------------------------------------------------------------ routing and forward
    @contextmanager
    def route(self, client_ids: torch.Tensor | Sequence[int] | int, *, trusted: bool = False,
              contiguous: bool | None = None) -> Iterator["MultiLoRAModel"]:
        """Route the forwards run inside the block: sample b goes through client ``client_ids[b]``.

        Args:
            client_ids: int ``[batch]`` with values in ``[-1, N)`` (``-1``: the frozen base model,
                original head included), or one int for every sample. Ids are expanded over the
                sequence positions of each sample; all wrapped layers share one ``LoRAPlan``.
            trusted, contiguous: hints of a caller that built the ids itself (see
                ``RoutingContext.route``); with both, routing reads nothing back to the host.
        """
        with self.context.route(client_ids, device=self._device(), trusted=trusted, contiguous=contiguous):
            yield self

    def forward(self, *args, **kwargs):
        """Call the wrapped model; must run inside ``route`` (its ids must match the batch size)."""
        ids = self.context.client_ids
        if ids is None:
            raise RuntimeError("forward: no routing is set; run the forward inside `with model.route(client_ids):`")
        if isinstance(ids, torch.Tensor):
            source, batch = _batch_size(args, kwargs)
            if batch is not None and batch != ids.numel():
                raise ValueError(
                    f"client_ids: expected one id per sample, batch size {batch} ({source}.shape[0]), "
                    f"got {ids.numel()} ids"
                )
        if self.training and not self.backbone_train_mode:
            self._sync_checkpointing_modes()
        return self.backbone(*args, **kwargs)

    def train(self, mode: bool = True) -> "MultiLoRAModel":
        super().train(mode)
        if mode and not self.backbone_train_mode:
            for module in self.backbone.modules():
                if not isinstance(module, (MultiLoRALinear, ClientHeadBank)):
                    # bitsandbytes layers follow the mode, as under PEFT: their flag picks
                    # bitsandbytes' training matmul (int8 on CPU: the dequantized weight, no activation
                    # quantization); they have no dropout.
                    module.training = quantization_of(module) is not None
            for _, module in self._lora + self._heads:
                module.base.training = quantization_of(module.base) is not None
            self._sync_checkpointing_modes()
        return self

    def _sync_checkpointing_modes(self) -> None:
        """In training mode, layers with transformers' gradient checkpointing on are in training mode:
        they checkpoint only then (their dropout modules are children, kept off by ``train``). Read at
        every forward, so ``gradient_checkpointing_enable`` may come before or after ``train()``."""
        for module in self._checkpointable:
            module.training = module.gradient_checkpointing is True

    # ------------------------------------------------------------------ per-client settings
    def set_trainable(self, mask: torch.Tensor | None) -> None:
        """Which blocks each client trains.

        Args:
            mask: bool ``[L, N]``; ``mask[l, c] = False`` keeps the adapters of block l active for
                client c in the forward pass but gives them no gradient (no weight-gradient work,
                no Fisher norm). ``None``: everything trainable.
        """
        shape = (self.num_blocks, self.num_clients)
        if mask is None:
            mask = torch.ones(shape, dtype=torch.bool)
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"mask: expected a bool tensor [L, N] = {shape}, got {type(mask).__name__}")
        if mask.dtype != torch.bool:
            raise TypeError(f"mask: expected dtype torch.bool, got {mask.dtype}")
        if tuple(mask.shape) != shape:
            raise ValueError(f"mask: expected shape [L, N] = {shape}, got {tuple(mask.shape)}")
        self._trainable.copy_(mask)
        for name, layer in self._lora:
            layer.trainable.copy_(self._trainable[self._block_of[name]])

    def trainable_mask(self) -> torch.Tensor:
        """bool ``[L, N]``, the mask last given to ``set_trainable`` (all True initially)."""
        return self._trainable.clone()

    def set_ranks(self, ranks: Mapping[int, int] | Sequence[int] | torch.Tensor) -> None:
        """Per-client LoRA ranks (HetLoRA); client c is scaled by ``alpha / ranks[c]``.

        Args:
            ranks: N ints in ``[0, max_rank]``, or ``{client: rank}`` for some clients. Rank 0: the
                slot has no adapter (its rows get the base layers' output) and scale 0.
        """
        if isinstance(ranks, Mapping):
            values = self.ranks
            for client, rank in ranks.items():
                if not 0 <= int(client) < self.num_clients:
                    raise ValueError(f"ranks: expected client keys in [0, {self.num_clients}), got {client}")
                values[int(client)] = rank
            ranks = values
        values = check_ranks(ranks, self.num_clients, self.max_rank)
        for _, layer in self._lora:
            layer.set_ranks(values)

    def set_rank_scaling(self, mode: str) -> None:
        """How a client of rank ``r_c`` is scaled: ``"client"`` (``alpha / r_c``, default) or
        ``"max"`` (``alpha / r_max`` for every client; see ``MultiLoRALinear.set_rank_scaling``)."""
        for _, layer in self._lora:
            layer.set_rank_scaling(mode)

    @property
    def rank_scaling(self) -> str:
        """The rank scaling in force (``set_rank_scaling``; read back from the scales after ``load_state_dict``)."""
        return self._lora[0][1].rank_scaling

    def scale_of(self, rank: int) -> float:
        """The LoRA scale of a client slot of rank ``rank`` under the current rank scaling (0 for rank 0,
        as ``MultiLoRALinear`` scales it)."""
        if rank == 0:
            return 0.0
        return self.alpha / (self.max_rank if self.rank_scaling == "max" else rank)

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype of the frozen backbone, in which the forward and backward passes compute (a
        quantized base's 4-bit layers multiply in their own ``compute_dtype``, see ``fedhello.nn.quantized``)."""
        banks = {id(p) for _, _, p in self.lora_banks()} | {id(p) for _, p in self.head_banks()}
        return next(p.dtype for p in self.backbone.parameters() if p.is_floating_point() and id(p) not in banks)

    def set_compute_dtype(self, dtype: torch.dtype) -> None:
        """Cast the frozen backbone (base layers, embeddings, norms) to ``dtype``, in place.

        The adapter and head banks, the LoRA scales and the Fisher accumulators stay float32:
        they are the master weights the optimizer updates and the server aggregates; each
        forward casts the banks to the activations' dtype, and their gradients come back float32.

        Args:
            dtype: torch.float32, torch.bfloat16 or torch.float16.
        """
        if dtype not in COMPUTE_DTYPES:
            raise ValueError(f"dtype: expected one of {COMPUTE_DTYPES}, got {dtype}")
        banks = (MultiLoRALinear, ClientHeadBank)
        for module in self.backbone.modules():
            if isinstance(module, banks):
                continue  # its own tensors are master weights/accumulators; its .base is visited
            for value in [*module.parameters(recurse=False), *module.buffers(recurse=False)]:
                if value.is_floating_point():
                    value.data = value.data.to(dtype)

    def seed_dropout(self, seeds: int | Mapping[int, int]) -> None:
        """Restart the per-client LoRA-dropout generators (see ``RoutingContext.seed_dropout``)."""
        self.context.seed_dropout(seeds)

    def set_backend(self, backend: str) -> None:
        """The ``multi_lora_linear`` backend of every wrapped layer."""
        check_settings(self.num_clients, self.max_rank, self.alpha, self.dropout, backend)
        for _, layer in self._lora:
            layer.backend = backend

    # ------------------------------------------------------------------ Fisher norms
    def reset_fisher_norms(self) -> None:
        """Zero the squared gradient norms accumulated by backward passes."""
        for _, layer in self._lora:
            layer.grad_sqnorm.zero_()

    def fisher_norms(self) -> torch.Tensor:
        """float32 ``[L, N]``: for block l and client c, the sum over the block's adapters of
        ``||dA_c||^2 + ||dB_c||^2`` accumulated since ``reset_fisher_norms``."""
        out = torch.zeros(self.num_blocks, self.num_clients, dtype=torch.float32, device=self._device())
        for name, layer in self._lora:
            out[self._block_of[name]] += layer.grad_sqnorm
        return out

    # ------------------------------------------------------------------ banks and state
    def lora_banks(self) -> list[tuple[str, int, nn.Parameter]]:
        """``(state name, block, bank)`` of every adapter bank.

        Banks are ``lora_a`` float32 ``[N, r_max, d_in]`` and ``lora_b`` float32 ``[N, d_out, r_max]``.
        """
        out = []
        for name, layer in self._lora:
            block = self._block_of[name]
            out.append((f"{name}.lora_a", block, layer.lora_a))
            out.append((f"{name}.lora_b", block, layer.lora_b))
        return out

    def head_banks(self) -> list[tuple[str, nn.Parameter]]:
        """``(state name, bank)`` of every per-client head parameter (``weight [N, out, in]``, ``bias [N, out]``)."""
        out = []
        for name, head in self._heads:
            out.append((f"{name}.weight", head.weight))
            if head.bias is not None:
                out.append((f"{name}.bias", head.bias))
        return out

    def optimizer_banks(self) -> list[nn.Parameter]:
        """Every adapter bank (``lora_banks`` order), then every head bank (``head_banks`` order): the
        parameters of ``masked_optimizer``, in the order of ``step_masks``."""
        return [p for _, _, p in self.lora_banks()] + [p for _, p in self.head_banks()]

    def masked_optimizer(self, name: str = "adamw", lr: float = 1e-3, weight_decay: float = 0.0,
                         momentum: float = 0.0) -> MaskedAdamW | MaskedSGD:
        """An optimizer over ``optimizer_banks()`` that steps only the slots its masks select.

        ``torch.optim`` over the banks moves slots that are frozen (``set_trainable``) or got no
        rows: their gradient is zero, but AdamW's momentum and any weight decay still update them.
        Step this one with ``step_masks`` of the batch: every other slot keeps its values and its
        optimizer state bit for bit, as if it had been trained alone.

        Args:
            name: "adamw" (``torch.optim.AdamW``'s arithmetic) or "sgd" (``torch.optim.SGD``'s).
            lr, weight_decay, momentum: as in torch (``momentum`` is SGD's); defaults 1e-3, 0 and 0.
        """
        return make_masked_optimizer(name, self.optimizer_banks(), lr, weight_decay, momentum)

    def step_masks(self, client_ids: torch.Tensor | Sequence[int] | int, *, trusted: bool = False) -> list[torch.Tensor]:
        """Which slots of each bank an optimizer step after a batch routed by ``client_ids`` updates.

        A slot is updated if the batch routed rows to it and, for an adapter bank, its block is
        trainable for that slot (``set_trainable``); heads have no trainable mask. Nothing is read
        back to the host (unless the ids are range-checked).

        Args:
            client_ids: the routing of the batch, as given to ``route``.
            trusted: the ids are known to lie in ``[-1, N)`` (no range check, as in ``route``).

        Returns:
            one bool ``[N]`` per bank of ``optimizer_banks()``, on the banks' device.
        """
        device = self._device()
        ids = normalize_client_ids(client_ids, self.num_clients, device, check_range=not trusted)
        # Slot c is entry c + 1; entry 0 gathers the rows routed to -1 (the base model).
        hit = torch.zeros(self.num_clients + 1, dtype=torch.bool, device=device)
        index = torch.tensor([ids + 1], device=device) if isinstance(ids, int) else ids + 1
        routed = hit.index_fill_(0, index, True)[1:]
        masks = []
        for _, layer in self._lora:
            trained = routed.to(layer.trainable.device) & layer.trainable
            masks += [trained, trained]  # lora_a, lora_b
        return masks + [routed.to(p.device) for _, p in self.head_banks()]

    def tensor_blocks(self) -> dict[str, int | None]:
        """State name -> block of every tensor of a client state (None for head tensors)."""
        blocks: dict[str, int | None] = {name: block for name, block, _ in self.lora_banks()}
        blocks.update({name: None for name, _ in self.head_banks()})
        return blocks

    def _banks(self) -> dict[str, nn.Parameter]:
        banks = {name: p for name, _, p in self.lora_banks()}
        banks.update(dict(self.head_banks()))
        return banks

    def check_client(self, client: int, arg: str = "client") -> int:
        """``client`` as an ``int`` if it is a valid slot index (a Python or numpy integer, or a 0-d
        integer tensor); TypeError/ValueError naming ``arg`` otherwise."""
        if isinstance(client, torch.Tensor) and client.dim() == 0 and not client.is_floating_point() \
                and client.dtype != torch.bool:
            client = int(client)
        if isinstance(client, bool) or not isinstance(client, numbers.Integral):
            raise TypeError(f"{arg}: expected an int slot in [0, {self.num_clients}), got {type(client).__name__}")
        if not 0 <= client < self.num_clients:
            raise ValueError(f"{arg}: expected a slot in [0, {self.num_clients}), got {client}")
        return int(client)

    def client_state(self, client: int) -> dict[str, torch.Tensor]:
        """One client's adapters and heads as a state dict of detached float32 copies (no slot dim)."""
        client = self.check_client(client)
        return {name: bank[client].detach().clone() for name, bank in self._banks().items()}

    def check_state(self, state: Mapping[str, torch.Tensor], strict: bool) -> dict[str, nn.Parameter]:
        """Validate a client state's names and shapes (all present if ``strict``); return the banks by name."""
        if not isinstance(state, Mapping):
            raise TypeError(f"state: expected a mapping name -> tensor, got {type(state).__name__}")
        banks = self._banks()
        unknown = [k for k in state if k not in banks]
        if unknown:
            raise ValueError(f"state: unexpected tensor {unknown[0]!r} (not an adapter or head of this model)")
        if strict:
            missing = [k for k in banks if k not in state]
            if missing:
                raise ValueError(f"state: missing tensor {missing[0]!r} ({len(missing)} missing in all)")
        for key, value in state.items():
            if not isinstance(value, torch.Tensor):
                raise TypeError(f"state: {key!r} expected a tensor, got {type(value).__name__}")
            expected = tuple(banks[key].shape[1:])
            if tuple(value.shape) != expected:
                raise ValueError(f"state: {key!r} expected shape {expected}, got {tuple(value.shape)}")
        return banks

    @torch.no_grad()
    def load_client_state(self, client: int, state: Mapping[str, torch.Tensor], strict: bool = True) -> None:
        """Write a state dict (as returned by ``client_state``) into slot ``client``.

        Args:
            strict: require every adapter and head tensor; otherwise absent ones keep their values.
        """
        client = self.check_client(client)
        banks = self.check_state(state, strict)
        for key, value in state.items():
            banks[key][client].copy_(value)

    @torch.no_grad()
    def broadcast_state(self, state: Mapping[str, torch.Tensor], clients: Iterable[int] | torch.Tensor) -> None:
        """Copy one state dict (e.g. the global adapters) into every slot of ``clients``."""
        if isinstance(clients, torch.Tensor):
            clients = clients.flatten().tolist()
        if not isinstance(clients, Iterable) or isinstance(clients, (str, bytes)):
            raise TypeError(f"clients: expected a list of slots (ints in [0, {self.num_clients})), got "
                            f"{type(clients).__name__}")
        slots = [self.check_client(c, "clients") for c in clients]
        banks = self.check_state(state, strict=True)
        if not slots:
            return
        index = torch.tensor(slots, dtype=torch.long, device=self._device())
        for key, value in state.items():
            bank = banks[key]
            bank.index_copy_(0, index, value.to(bank).unsqueeze(0).expand(len(slots), *value.shape))


def _batch_size(args: tuple, kwargs: dict) -> tuple[str | None, int | None]:
    """The name and first dimension of the first batched model input found."""
    for key in _BATCH_INPUTS:
        value = kwargs.get(key)
        if isinstance(value, torch.Tensor) and value.dim() >= 1:
            return key, value.shape[0]
    for i, value in enumerate(args):
        if isinstance(value, torch.Tensor) and value.dim() >= 1:
            return f"args[{i}]", value.shape[0]
    return None, None


def _head_linears(model: nn.Module, head_modules: str | Sequence[str] | None) -> tuple[list[str], list[str]]:
    """(matched head modules, the nn.Linear layers inside them that become client banks)."""
    if head_modules is None:
        return [], []
    if head_modules == "auto":
        roots = [n for n, _ in model.named_modules() if n and n.rsplit(".", 1)[-1] in AUTO_HEAD_NAMES]
        roots = [n for n in roots if not any(n.startswith(r + ".") for r in roots)]
    else:
        roots = match_modules(model, head_modules, "head_modules")
    linears: list[str] = []
    for root in roots:
        module = model.get_submodule(root)
        if isinstance(module, nn.Linear):
            linears.append(root)
            continue
        inside = [f"{root}.{n}" for n, m in module.named_modules() if n and isinstance(m, nn.Linear)]
        covered = {id(p) for n in inside for p in model.get_submodule(n).parameters()}
        other = [n for n, p in module.named_parameters() if id(p) not in covered]
        if not inside:
            raise ValueError(f"head_modules: expected an nn.Linear or a module of nn.Linear layers, got {root!r} "
                             f"({type(module).__name__}) with no nn.Linear inside")
        if other:
            raise ValueError(f"head_modules: expected only nn.Linear layers inside {root!r}, got parameters "
                             f"{other[:3]} outside them (name the linear layers to bank instead)")
        linears.extend(n for n in inside if n not in linears)
    return roots, linears


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def inject_multi_lora(
    model: nn.Module,
    target_modules: str | Sequence[str],
    num_clients: int,
    rank: int = 8,
    ranks: Sequence[int] | None = None,
    alpha: float = 16.0,
    dropout: float = 0.0,
    head_modules: str | Sequence[str] | None = "auto",
    backend: str = "auto",
    seed: int = 0,
    backbone_train_mode: bool = False,
) -> MultiLoRAModel:
    """Give a ``transformers`` model N client adapter slots on its target layers, in place.

    Args:
        model: any ``nn.Module`` whose targets are ``nn.Linear`` or transformers ``Conv1D``
            inside its transformer blocks (BERT/MiniLM, ViT, LLaMA/SmolLM2, GPT-2, ...). All its
            parameters are frozen; none is copied.
        target_modules: names matched as PEFT does (a list: exact name or ``.name`` suffix; a
            string: a regular expression on the whole qualified name), e.g. ``["query", "value"]``.
        num_clients: N, the number of client slots.
        rank: r_max, the bank's rank dimension.
        ranks: per-client ranks in ``[0, rank]`` (HetLoRA; 0: no adapter); default all ``rank``.
        alpha: LoRA alpha; client c is scaled by ``alpha / ranks[c]`` (PEFT's ``lora_alpha / r``; 0 for
            rank 0).
        dropout: LoRA dropout probability (per-client generators, seeded from ``seed``).
        head_modules: modules that each client trains in full, like PEFT's ``modules_to_save``:
            ``"auto"`` (every module named "classifier" or "score"), names/regex as for targets,
            or None. Each must be an ``nn.Linear`` or contain only ``nn.Linear`` layers.
        backend: the ``multi_lora_linear`` backend.
        seed: seeds the adapter init (every slot starts from the same PEFT init) and dropout.
        backbone_train_mode: let ``train()`` switch the backbone's own dropout on as well.

    Returns:
        the ``MultiLoRAModel`` wrapping ``model``.

    Raises:
        ValueError: a target name matches nothing or matches a module that is not a linear
            layer or not inside a transformer block; bad ranks, alpha, dropout or backend; a
            bitsandbytes layer that cannot serve as a frozen base (``check_quantized_base``).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch nn.Module (a transformers model), got {type(model).__name__}")
    if any(isinstance(m, (MultiLoRALinear, ClientHeadBank)) for m in model.modules()):
        raise ValueError("model: already holds multi-client modules (inject_multi_lora was applied before)")
    check_settings(num_clients, rank, alpha, dropout, backend)
    rank_list = check_ranks(ranks, num_clients, rank)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed: expected an int, got {type(seed).__name__}")
    if seed < 0:
        raise ValueError(f"seed: expected >= 0, got {seed}")

    head_roots, head_names = _head_linears(model, head_modules)
    targets = [
        n for n in match_modules(model, target_modules, "target_modules")
        if not any(n == h or n.startswith(h + ".") for h in head_roots)
    ]
    if not targets:
        raise ValueError(f"target_modules: {target_modules!r} only matches head modules {head_roots}")
    for name in targets:
        module = model.get_submodule(name)
        if "experts" in name.split("."):
            # An expert sees only the tokens its router sends it, as a 2-D gather: rows no longer
            # line up with samples, so a per-sample client id cannot be applied to them.
            raise ValueError(f"target_modules: {name!r} is inside a mixture-of-experts layer; per-client "
                             "adapters on experts are not supported (target the attention projections)")
        if not is_linear_like(module):
            raise ValueError(
                f"target_modules: {name!r} is a {type(module).__name__}; expected nn.Linear or transformers "
                "Conv1D (name the linear layers inside it)"
            )
    blocks = find_blocks(model, targets, "target_modules")
    # Every bitsandbytes layer of the base, targets or not: one quantized by transformers or by the
    # caller never went through quantize_linear (see prepare_quantized_base).
    quantized = [m for n, m in model.named_modules() if check_quantized_base(m, f"model: {n}") is not None]

    model.requires_grad_(False)
    for layer in quantized:
        prepare_quantized_base(layer)
    context = RoutingContext(num_clients, seed)
    generator = torch.Generator().manual_seed(seed)
    for name in targets:
        _replace(model, name, MultiLoRALinear(
            model.get_submodule(name), num_clients, rank, ranks=rank_list, alpha=alpha, dropout=dropout,
            backend=backend, context=context, generator=generator, name=name,
        ))
    for name in head_names:
        _replace(model, name, ClientHeadBank(model.get_submodule(name), num_clients, context=context, name=name))
    return MultiLoRAModel(
        model, context, blocks, targets, head_names, max_rank=rank, alpha=alpha, dropout=dropout,
        backbone_train_mode=backbone_train_mode,
    )
