"""Bad input to multi_lora_linear / LoRAPlan.build: the right error type, naming the argument."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedhello.kernels import LoRAPlan, multi_lora_linear


def _good(n=3, t=10, d_in=8, d_out=6, r=4, dtype=torch.float32):
    return dict(
        x=torch.randn(t, d_in, dtype=dtype),
        weight=torch.randn(d_out, d_in, dtype=dtype),
        bias=torch.randn(d_out, dtype=dtype),
        lora_a=torch.randn(n, r, d_in, dtype=dtype),
        lora_b=torch.randn(n, d_out, r, dtype=dtype),
        plan=LoRAPlan.build(torch.randint(-1, n, (t,)), n),
        scaling=1.0,
    )


def _call(**overrides):
    kw = _good()
    kw.update(overrides)
    return multi_lora_linear(**kw)


BAD_CALLS = [
    # (overrides, error type, argument named in the message)
    (dict(x=torch.randn(10, 9)), ValueError, "x"),
    (dict(x=[[1.0]]), TypeError, "x"),
    (dict(x=torch.randint(0, 3, (10, 8))), TypeError, "x"),
    (dict(weight=torch.randn(6, 8, 1)), ValueError, "weight"),
    (dict(weight=torch.randn(6, 8, dtype=torch.float64)), TypeError, "weight"),
    (dict(bias=torch.randn(5)), ValueError, "bias"),
    (dict(bias=torch.randn(6, dtype=torch.float16)), TypeError, "bias"),
    (dict(lora_a=torch.randn(3, 4, 7)), ValueError, "lora_a"),
    (dict(lora_a=torch.randn(3, 4)), ValueError, "lora_a"),
    (dict(lora_b=torch.randn(3, 6, 5)), ValueError, "lora_b"),
    (dict(lora_b=torch.randn(2, 6, 4)), ValueError, "lora_b"),
    (dict(lora_b=torch.randn(3, 6, 4, dtype=torch.bfloat16)), TypeError, "lora_b"),
    (dict(plan=LoRAPlan.build(torch.zeros(11, dtype=torch.long), 3)), ValueError, "plan"),
    (dict(plan=LoRAPlan.build(torch.zeros(10, dtype=torch.long), 4)), ValueError, "plan"),
    (dict(plan=torch.zeros(10)), TypeError, "plan"),
    (dict(scaling=torch.ones(2)), ValueError, "scaling"),
    (dict(scaling=torch.ones(3, dtype=torch.long)), TypeError, "scaling"),
    (dict(scaling="1"), TypeError, "scaling"),
    (dict(scaling=torch.ones(3, requires_grad=True)), ValueError, "scaling"),
    (dict(scaling=float("nan")), ValueError, "scaling"),
    (dict(scaling=float("-inf")), ValueError, "scaling"),
    (dict(scaling=torch.tensor([1.0, float("nan"), 2.0])), ValueError, "scaling"),
    (dict(scaling=[1.0, 2.0, float("inf")]), ValueError, "scaling"),
    (dict(dropout_p=np.float32(1.0), dropout_seeds=[1, 2, 3]), ValueError, "dropout_p"),
    (dict(ranks=[1, 2, 5]), ValueError, "ranks"),
    (dict(ranks=[1, -1, 2]), ValueError, "ranks"),
    (dict(ranks=[1, 2]), ValueError, "ranks"),
    (dict(ranks=torch.tensor([1.0, 2.0, 3.0])), TypeError, "ranks"),
    (dict(trainable=torch.ones(3)), TypeError, "trainable"),
    (dict(trainable=torch.ones(4, dtype=torch.bool)), ValueError, "trainable"),
    (dict(grad_sqnorm=torch.zeros(3, dtype=torch.float64)), TypeError, "grad_sqnorm"),
    (dict(grad_sqnorm=torch.zeros(4)), ValueError, "grad_sqnorm"),
    (dict(grad_sqnorm=torch.zeros(3, 2)[:, 0]), ValueError, "grad_sqnorm"),
    (dict(weight=torch.randn(6, 8, device="meta")), ValueError, "weight"),
    (dict(lora_a=torch.randn(3, 4, 8, device="meta")), ValueError, "lora_a"),
    (dict(grad_sqnorm=torch.zeros(3, device="meta")), ValueError, "grad_sqnorm"),
    (dict(backend="fast"), ValueError, "backend"),
    (dict(backend=3), TypeError, "backend"),
    (dict(backend="cuda"), ValueError, "backend"),
]


@pytest.mark.parametrize("overrides,error,argument", BAD_CALLS,
                         ids=[f"{a}-{i}" for i, (_, _, a) in enumerate(BAD_CALLS)])
def test_bad_input_names_the_argument(overrides, error, argument):
    with pytest.raises(error) as info:
        _call(**overrides)
    assert str(info.value).startswith(f"{argument}:"), str(info.value)


def test_message_states_expected_and_actual():
    with pytest.raises(ValueError, match=r"x: expected last dimension d_in = 8 .*got 9"):
        _call(x=torch.randn(10, 9))
    with pytest.raises(ValueError, match=r"ranks: expected values in \[0, r_max=4\], got min 1 and max 5"):
        _call(ranks=[1, 2, 5])


def test_numpy_scalars_are_accepted_like_floats():
    kw = _good()
    kw["backend"] = "torch"  # argument handling only: no compiled backend to build on first use
    want = multi_lora_linear(**{**kw, "scaling": 0.5})
    got = multi_lora_linear(**{**kw, "scaling": np.float32(0.5)})
    assert torch.equal(got, want)
    dropped = multi_lora_linear(**{**kw, "dropout_p": np.float64(0.25), "dropout_seeds": [1, 2, 3]})
    assert dropped.shape == want.shape


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="backend: 'triton' needs CUDA tensors"):
        _call(backend="triton")


def test_float64_is_rejected_by_triton():
    kw = _good(dtype=torch.float64)
    if torch.cuda.is_available():  # the GPU path: no interpreter, so the tensors must be on the GPU
        kw = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
        kw["plan"] = LoRAPlan.build(kw["plan"].client_ids.cuda(), 3)
    with pytest.raises(TypeError, match="x: backend 'triton' supports dtypes"):
        multi_lora_linear(**kw, backend="triton")


@pytest.mark.parametrize("ids,n,error,fragment", [
    (torch.tensor([0, 1, 3]), 3, ValueError, "client_ids: expected values in [-1, 3)"),
    (torch.tensor([0, -2, 1]), 3, ValueError, "got min -2"),
    (torch.tensor([0.0, 1.0]), 3, TypeError, "client_ids: expected an integer dtype"),
    (torch.zeros(2, 2, dtype=torch.long), 3, ValueError, "client_ids: expected a 1-D tensor"),
    ([0, 1], 3, TypeError, "client_ids: expected a torch.Tensor"),
    (torch.tensor([0, 1]), 0, ValueError, "num_clients: expected >= 1"),
    (torch.tensor([0, 1]), 2.0, TypeError, "num_clients: expected an int"),
])
def test_plan_rejects_bad_client_ids(ids, n, error, fragment):
    with pytest.raises(error) as info:
        LoRAPlan.build(ids, n)
    assert fragment in str(info.value)
