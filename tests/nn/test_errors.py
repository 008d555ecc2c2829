"""Bad arguments fail early with messages that name the argument, the expected and the actual value."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fedhello.nn import ClientHeadBank, MultiLoRALinear, inject_multi_lora

from .tiny import make_batch, make_model


def _bert(**kw):
    return inject_multi_lora(make_model("bert"), ["query", "value"], 3, rank=4, backend="torch", **kw)


def test_unknown_target_module_names():
    with pytest.raises(ValueError, match=r"target_modules: no module named 'quer' in BertForSequenceClassification; "
                                         r"its linear layers are named \[.*'query'.*\]"):
        inject_multi_lora(make_model("bert"), ["quer"], 3)
    with pytest.raises(ValueError, match="target_modules: regular expression 'x.*y' matches no module"):
        inject_multi_lora(make_model("bert"), "x.*y", 3)
    with pytest.raises(TypeError, match="target_modules: expected a list of module names"):
        inject_multi_lora(make_model("bert"), [3], 3)


def test_targets_must_be_linear_layers_inside_blocks():
    with pytest.raises(ValueError,
                       match="target_modules: 'bert.encoder.layer.0.attention.self' is a BertSelfAttention"):
        inject_multi_lora(make_model("bert"), ["self"], 3)
    with pytest.raises(ValueError,
                       match="target_modules: module 'bert.pooler.dense' is not inside a transformer block"):
        inject_multi_lora(make_model("bert"), ["pooler.dense"], 3)


def test_mixture_of_experts_targets_are_refused():
    """An expert sees a 2-D gather of the tokens routed to it: rows no longer map to samples."""

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.q = nn.Linear(4, 4)
            self.experts = nn.ModuleList(nn.Linear(4, 4) for _ in range(2))

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList(Block() for _ in range(2))

    with pytest.raises(ValueError, match=r"target_modules: 'layers\.0\.experts\.0' is inside a mixture-of-experts"):
        inject_multi_lora(Model(), "layers\\.\\d\\.(q|experts\\.\\d)", 2, head_modules=None)
    assert inject_multi_lora(Model(), ["q"], 2, head_modules=None).num_blocks == 2


def test_head_modules_must_be_linear():
    with pytest.raises(ValueError, match="head_modules: expected an nn.Linear or a module of nn.Linear layers, "
                                         "got 'bert.embeddings' \\(BertEmbeddings\\) with no nn.Linear inside"):
        inject_multi_lora(make_model("bert"), ["query"], 3, head_modules=["embeddings"])
    with pytest.raises(ValueError, match="head_modules: expected only nn.Linear layers inside "
                                         "'bert.encoder.layer.1.output', got parameters \\['LayerNorm.weight'"):
        inject_multi_lora(make_model("bert"), ["query"], 3, head_modules=["encoder.layer.1.output"])


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"num_clients": 0}, ValueError, "num_clients: expected >= 1, got 0"),
        ({"rank": 0}, ValueError, "rank: expected >= 1, got 0"),
        ({"ranks": [4, 4]}, ValueError, r"ranks: expected one rank per client \(3\), got 2"),
        ({"ranks": [4, 5, 1]}, ValueError, r"ranks: expected values in \[0, rank=4\] \(rank is r_max\), got 5"),
        ({"ranks": [4.0, 4, 4]}, TypeError, "ranks: expected a list of ints"),
        ({"alpha": -1.0}, ValueError, "alpha: expected a finite number > 0, got -1.0"),
        ({"alpha": float("inf")}, ValueError, "alpha: expected a finite number > 0, got inf"),
        ({"dropout": 1.0}, ValueError, r"dropout: expected a probability in \[0, 1\), got 1.0"),
        ({"backend": "gpu"}, ValueError, "backend: expected one of"),
    ],
)
def test_bad_settings(kwargs, error, message):
    args = {"num_clients": 3, "rank": 4} | kwargs
    with pytest.raises(error, match=message):
        inject_multi_lora(make_model("bert"), ["query"], **args)


def test_injecting_twice_is_refused():
    model = _bert()
    with pytest.raises(ValueError, match="model: already holds multi-client modules"):
        inject_multi_lora(model.backbone, ["key"], 3)


def test_routing_of_the_wrong_length():
    model = _bert()
    batch = make_batch("bert", 4)
    with model.route(torch.tensor([0, 1, 2])):
        with pytest.raises(ValueError, match=r"client_ids: expected one id per sample, batch size 4 "
                                             r"\(input_ids.shape\[0\]\), got 3 ids"):
            model(**batch)


def test_routing_a_layer_of_another_batch_size():
    layer = MultiLoRALinear(nn.Linear(8, 6), 3, rank=2, backend="torch")
    with layer.context.route(torch.tensor([0, 1, 2])):
        with pytest.raises(ValueError, match=r"client_ids: routing has 3 samples but MultiLoRALinear got input of "
                                             r"shape \(4, 5, 8\)"):
            layer(torch.randn(4, 5, 8))


@pytest.mark.parametrize(
    ("ids", "error", "message"),
    [
        (torch.tensor([0, 3]), ValueError,
         r"client_ids: expected values in \[-1, 3\) \(num_clients=3\), got min 0 and max 3"),
        (torch.tensor([-2, 0]), ValueError, r"client_ids: expected values in \[-1, 3\)"),
        (5, ValueError, r"client_ids: expected a client id in \[-1, 3\), got 5"),
        (torch.tensor([0.0, 1.0]), TypeError, "client_ids: expected an integer dtype, got torch.float32"),
        (torch.zeros(2, 2, dtype=torch.long), ValueError, "client_ids: expected a 1-D tensor"),
        (True, TypeError, "client_ids: expected an int"),
    ],
)
def test_bad_client_ids(ids, error, message):
    model = _bert()
    with pytest.raises(error, match=message):
        with model.route(ids):
            pass


def test_forward_without_routing():
    model = _bert()
    with pytest.raises(RuntimeError, match=r"forward: no routing is set; run the forward inside `with model.route"):
        model(**make_batch("bert", 2))


def test_bad_trainable_mask():
    model = _bert()
    with pytest.raises(ValueError, match=r"mask: expected shape \[L, N\] = \(2, 3\), got \(3, 2\)"):
        model.set_trainable(torch.ones(3, 2, dtype=torch.bool))
    with pytest.raises(TypeError, match="mask: expected dtype torch.bool, got torch.int64"):
        model.set_trainable(torch.ones(2, 3, dtype=torch.long))


def test_wrapping_the_wrong_module_types():
    with pytest.raises(TypeError, match="base: expected nn.Linear or transformers Conv1D, got LayerNorm"):
        MultiLoRALinear(nn.LayerNorm(4), 2)
    with pytest.raises(TypeError, match="base: expected an nn.Linear head, got Conv2d"):
        ClientHeadBank(nn.Conv2d(1, 1, 1), 2)


def test_slot_arguments_take_any_integer_and_name_themselves():
    import numpy as np

    model = _bert()
    state = model.client_state(np.int64(1))
    assert model.client_state(torch.tensor(1)).keys() == state.keys()
    model.broadcast_state(state, [np.int64(0), 2])
    with pytest.raises(TypeError, match=r"^clients: expected a list of slots"):
        model.broadcast_state(state, 2)
    with pytest.raises(TypeError, match=r"^client: expected an int slot"):
        model.client_state(1.0)
    with pytest.raises(ValueError, match=r"^client: expected a slot in \[0, 3\), got 3"):
        model.client_state(np.int32(3))


def test_evaluate_lm_batch_size_is_checked():
    from fedhello.nn.lm_eval import evaluate_lm

    with pytest.raises(ValueError, match=r"^batch_size: expected an int >= 1, got 0"):
        evaluate_lm(_bert(), {"labels": torch.zeros(2, 3, dtype=torch.long)}, batch_size=0)
