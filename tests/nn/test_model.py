"""Blocks, trainable masks, Fisher norms, client state, memory and dropout of ``MultiLoRAModel``."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

from fedhello.nn import ClientHeadBank, MultiLoRALinear, inject_multi_lora

from .tiny import ARCHS, make_batch, make_model, randomize_banks

N, RANK, ALPHA = 4, 4, 8.0


def _model(arch: str = "bert", **kw):
    kw = {"rank": RANK, "alpha": ALPHA, "backend": "torch"} | kw
    return inject_multi_lora(make_model(arch), ARCHS[arch].targets, N, **kw)


# ---------------------------------------------------------------------------- blocks
EXPECTED_BLOCKS = {
    "bert": ["bert.encoder.layer.{}.attention.self.query", "bert.encoder.layer.{}.attention.self.value"],
    "llama": ["model.layers.{}.self_attn.q_proj", "model.layers.{}.self_attn.v_proj", "model.layers.{}.mlp.down_proj"],
    "gpt2": ["transformer.h.{}.attn.c_attn", "transformer.h.{}.attn.c_proj", "transformer.h.{}.mlp.c_proj"],
    "vit": ["vit.layers.{}.attention.q_proj", "vit.layers.{}.attention.v_proj", "vit.layers.{}.mlp.fc2"],
}


@pytest.mark.parametrize("arch", sorted(EXPECTED_BLOCKS))
def test_blocks_are_discovered_per_architecture(arch):
    model = _model(arch)
    assert model.num_blocks == 2 and model.num_clients == N
    assert model.block_modules == {b: [t.format(b) for t in EXPECTED_BLOCKS[arch]] for b in range(2)}
    for name, _ in model.lora_modules:
        assert isinstance(model.backbone.get_submodule(name), MultiLoRALinear)
    assert [name for name, _ in model.head_modules] == [ARCHS[arch].head]


def test_gpt2_conv1d_is_wrapped_with_its_transposed_layout():
    model = _model("gpt2")
    layer = model.backbone.get_submodule("transformer.h.0.attn.c_attn")
    assert layer.conv1d and (layer.in_features, layer.out_features) == (32, 96)
    assert layer.lora_a.shape == (N, RANK, 32) and layer.lora_b.shape == (N, 96, RANK)


def test_encoder_decoder_blocks_are_numbered_one_list_after_the_other():
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    t5 = T5ForConditionalGeneration(T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=2,
                                             num_decoder_layers=3, num_heads=4))
    model = inject_multi_lora(t5, ["q", "v"], 2, rank=2, head_modules=None, backend="torch")
    assert model.num_blocks == 5
    assert model.block_modules[1] == ["encoder.block.1.layer.0.SelfAttention.q",
                                      "encoder.block.1.layer.0.SelfAttention.v"]
    assert model.block_modules[2][:2] == ["decoder.block.0.layer.0.SelfAttention.q",
                                          "decoder.block.0.layer.0.SelfAttention.v"]
    assert "decoder.block.2.layer.1.EncDecAttention.v" in model.block_modules[4]


def test_regex_targets_and_explicit_heads():
    model = _model("llama", head_modules=["score"])
    regex = inject_multi_lora(make_model("llama"), r".*layers\.1\.self_attn\.(q|k)_proj", N, rank=2,
                              head_modules=None, backend="torch")
    assert regex.num_blocks == 2  # the block list has 2 blocks even if only block 1 is targeted
    assert regex.block_modules == {0: [], 1: ["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.k_proj"]}
    assert regex.head_banks() == []
    assert isinstance(model.backbone.score, ClientHeadBank)


# ---------------------------------------------------------------------------- trainable and Fisher
def test_trainable_mask_and_fisher_norms_per_block():
    model = _model("llama")
    randomize_banks(model)
    mask = torch.tensor([[True, False, True, True], [False, True, True, False]])
    model.set_trainable(mask)
    assert torch.equal(model.trainable_mask(), mask)
    ids = torch.tensor([0, 1, 2, 3, 2, 1])
    batch = make_batch("llama", len(ids))
    with model.route(ids):
        masked_out = model(**batch).logits
    masked_out.square().sum().backward()

    expected = torch.zeros(2, N)
    for name, block, bank in model.lora_banks():
        for c in range(N):
            g = bank.grad[c]
            if mask[block, c]:
                assert g.abs().sum() > 0, f"{name} client {c} trains block {block} but got no gradient"
            else:
                assert torch.count_nonzero(g) == 0, f"{name} client {c} is frozen in block {block}"
            expected[block, c] += g.double().square().sum().float()
    fisher = model.fisher_norms()
    assert fisher.dtype == torch.float32 and fisher.shape == (2, N)
    torch.testing.assert_close(fisher, expected, rtol=1e-5, atol=0)
    assert torch.all((fisher > 0) == mask)

    # A frozen block still acts in the forward pass.
    model.set_trainable(None)
    with torch.no_grad(), model.route(ids):
        torch.testing.assert_close(model(**batch).logits, masked_out.detach(), rtol=0, atol=0)
    model.reset_fisher_norms()
    assert torch.count_nonzero(model.fisher_norms()) == 0


def test_fisher_norms_accumulate_over_backward_passes():
    model = _model("bert")
    randomize_banks(model)
    ids = torch.tensor([0, 3, 3])
    batch = make_batch("bert", 3)
    norms = []
    for _ in range(2):
        with model.route(ids):
            model(**batch).logits.sum().backward()
        norms.append(model.fisher_norms())
    assert norms[0][:, 0].min() > 0 and norms[0][:, 3].min() > 0
    torch.testing.assert_close(norms[1], 2 * norms[0], rtol=1e-6, atol=0)


# ---------------------------------------------------------------------------- state
def test_client_state_round_trip_and_broadcast():
    model = _model("gpt2")
    randomize_banks(model)
    state = model.client_state(2)
    assert set(state) == set(model.tensor_blocks())
    assert state["transformer.h.1.attn.c_attn.lora_a"].shape == (RANK, 32)
    assert state["transformer.h.1.attn.c_attn.lora_b"].shape == (96, RANK)
    assert state["score.weight"].shape == (3, 32)
    assert model.tensor_blocks()["transformer.h.1.mlp.c_proj.lora_b"] == 1
    assert model.tensor_blocks()["score.weight"] is None

    before = {name: p.detach().clone() for name, _, p in model.lora_banks()}
    model.broadcast_state(state, [0, 3])
    for name, _, bank in model.lora_banks():
        assert torch.equal(bank[0], state[name]) and torch.equal(bank[3], state[name])
        assert torch.equal(bank[1], before[name][1])
    state["transformer.h.0.attn.c_attn.lora_a"].add_(1.0)  # a copy: the bank is not aliased
    assert not torch.equal(model.client_state(2)["transformer.h.0.attn.c_attn.lora_a"],
                           state["transformer.h.0.attn.c_attn.lora_a"])
    model.load_client_state(1, state)
    assert all(torch.equal(model.client_state(1)[k], v) for k, v in state.items())


def test_client_state_errors():
    model = _model("bert")
    state = model.client_state(0)
    with pytest.raises(ValueError, match="client: expected a slot in \\[0, 4\\), got 4"):
        model.client_state(4)
    with pytest.raises(ValueError, match="state: unexpected tensor 'nope'"):
        model.load_client_state(0, {**state, "nope": torch.zeros(1)})
    with pytest.raises(ValueError, match="state: missing tensor"):
        model.load_client_state(0, {k: v for k, v in list(state.items())[1:]})
    key = "bert.encoder.layer.0.attention.self.query.lora_a"
    with pytest.raises(ValueError, match=f"state: '{key}' expected shape \\(4, 32\\), got \\(3, 32\\)"):
        model.load_client_state(0, {**state, key: torch.zeros(3, 32)})
    with pytest.raises(ValueError, match="clients: expected a slot"):
        model.broadcast_state(state, [0, 7])


def test_set_ranks_rescales_like_peft():
    model = _model("bert")
    model.set_ranks({1: 2, 3: 1})
    assert model.ranks == [4, 2, 4, 1]
    for _, layer in model.lora_modules:
        torch.testing.assert_close(layer.scaling, torch.tensor([ALPHA / 4, ALPHA / 2, ALPHA / 4, ALPHA / 1]))
    with pytest.raises(ValueError, match="ranks: expected values in \\[0, rank=4\\]"):
        model.set_ranks({0: 5})


# ---------------------------------------------------------------------------- memory
def _param_bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_parameter_memory_grows_only_by_the_banks(arch):
    pristine = make_model(arch)
    backbone_bytes = _param_bytes(pristine)
    extra = {}
    for n in (1, 2, 4, 8):
        hf = copy.deepcopy(pristine)
        storages = {p.data_ptr() for p in hf.parameters()}
        model = inject_multi_lora(hf, ARCHS[arch].targets, n, rank=RANK, backend="torch")
        # Every original tensor is still there, not copied, and no other frozen tensor was added.
        frozen = [p for p in model.parameters() if not p.requires_grad]
        assert {p.data_ptr() for p in frozen} == storages
        assert sum(p.numel() * p.element_size() for p in frozen) == backbone_bytes
        extra[n] = _param_bytes(model) - backbone_bytes
    per_client = extra[1]
    assert all(extra[n] == n * per_client for n in extra)
    # Per client: r (d_in + d_out) per wrapped layer plus one head copy, in float32.
    model_1 = inject_multi_lora(copy.deepcopy(pristine), ARCHS[arch].targets, 1, rank=RANK, backend="torch")
    expected = sum(RANK * (layer.in_features + layer.out_features) for _, layer in model_1.lora_modules)
    expected += sum(bank[0].numel() for _, bank in model_1.head_banks())
    assert per_client == 4 * expected


# ---------------------------------------------------------------------------- dropout and modes
def test_per_client_dropout_does_not_depend_on_the_batch():
    model = _model("bert", dropout=0.5)
    randomize_banks(model)
    model.train()
    batch = make_batch("bert", 6)
    ids = torch.tensor([1, 2, 1, 0, 2, 1])
    rows = (ids == 1).nonzero().flatten()

    model.seed_dropout({1: 123, 2: 5, 0: 9})
    with torch.no_grad(), model.route(ids):
        together = model(**batch).logits
    model.seed_dropout({1: 123})
    with torch.no_grad(), model.route(torch.ones(len(rows), dtype=torch.long)):
        alone = model(**{k: v[rows] for k, v in batch.items()}).logits
    torch.testing.assert_close(together[rows], alone, rtol=1e-5, atol=1e-6)

    # The same client id in another slot with the same seed draws the same masks.
    model.load_client_state(3, model.client_state(1))
    model.seed_dropout({3: 123})
    with torch.no_grad(), model.route(torch.full((len(rows),), 3)):
        other_slot = model(**{k: v[rows] for k, v in batch.items()}).logits
    torch.testing.assert_close(other_slot, alone, rtol=1e-5, atol=1e-6)

    model.eval()
    with torch.no_grad(), model.route(ids):
        no_dropout = model(**batch).logits
    assert (no_dropout[rows] - together[rows]).abs().max() > 1e-3, "dropout had no effect in training mode"


def test_dropout_only_on_the_adapter_path():
    """With zero adapters, dropout on the LoRA input must not change the base output."""
    pristine = make_model("bert")
    model = inject_multi_lora(copy.deepcopy(pristine), ["query", "value"], N, rank=RANK, dropout=0.9,
                              backend="torch")
    model.train()
    batch = make_batch("bert", 3)
    with torch.no_grad(), model.route(torch.tensor([0, 1, 2])):
        out = model(**batch).logits
    torch.testing.assert_close(out, pristine(**batch).logits, rtol=1e-5, atol=1e-6)


def test_train_mode_keeps_the_backbone_in_eval_unless_asked():
    model = _model("bert", dropout=0.1)
    model.train()
    assert all(layer.training for _, layer in model.lora_modules)
    assert all(head.training for _, head in model.head_modules)
    assert not model.backbone.bert.embeddings.dropout.training
    assert not model.backbone.training
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        free = inject_multi_lora(make_model("bert"), ["query"], 2, backbone_train_mode=True, backend="torch")
    free.train()
    assert free.backbone.bert.embeddings.dropout.training


def test_attributes_pass_through_to_the_backbone():
    model = _model("llama")
    assert model.config.model_type == "llama"
    assert model.num_parameters() == sum(p.numel() for p in model.backbone.parameters())


def test_bfloat16_backbone_with_float32_master_banks():
    pristine = make_model("llama")
    model = inject_multi_lora(copy.deepcopy(pristine).to(torch.bfloat16), ARCHS["llama"].targets, N, rank=RANK,
                              alpha=ALPHA, backend="torch")
    reference = inject_multi_lora(copy.deepcopy(pristine), ARCHS["llama"].targets, N, rank=RANK, alpha=ALPHA,
                                  backend="torch")
    randomize_banks(model, std=0.1)
    randomize_banks(reference, std=0.1)
    ids = torch.tensor([0, 3, 1, 3])
    batch = make_batch("llama", len(ids))
    with model.route(ids):
        out = model(**batch).logits
    with torch.no_grad(), reference.route(ids):
        expected = reference(**batch).logits
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), expected, rtol=0.05, atol=0.05)
    out.float().sum().backward()
    for name, _, bank in model.lora_banks():
        assert bank.dtype == torch.float32 and bank.grad.dtype == torch.float32, name
        assert bank.grad[[0, 1, 3]].abs().sum() > 0 and torch.count_nonzero(bank.grad[2]) == 0, name


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_dropout_runs_no_second_base_gemm(backend):
    """LoRA dropout lives in the adapter path: with p > 0 the frozen weight is multiplied exactly as
    often as with p = 0 (once forward, once for dx), and no per-client Python loop builds masks."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from fedhello.kernels.multi_lora import _extension

    if backend == "cpu" and _extension("cpu") is None:
        pytest.skip("csrc extension for cpu is not built")

    class WeightUses(TorchDispatchMode):
        def __init__(self, weight):
            super().__init__()
            self.storage, self.count = weight.untyped_storage().data_ptr(), 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            tensors = [a for a in args if isinstance(a, torch.Tensor)]
            if any(t.untyped_storage().data_ptr() == self.storage for t in tensors):
                if func.__name__.split(".")[0] in ("mm", "addmm", "addmm_", "matmul", "linear", "bmm"):
                    self.count += 1
            return func(*args, **(kwargs or {}))

    counts = {}
    for p in (0.0, 0.3):
        layer = MultiLoRALinear(torch.nn.Linear(24, 16), 3, rank=4, dropout=p, backend=backend).train()
        randomize = torch.Generator().manual_seed(0)
        with torch.no_grad():
            layer.lora_b.copy_(torch.randn(layer.lora_b.shape, generator=randomize))
        x = torch.randn(10, 24, requires_grad=True)
        mode = WeightUses(layer.base.weight)
        with layer.context.route(torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, -1, 2])), mode:
            layer(x).sum().backward()
        counts[p] = mode.count
    assert counts[0.0] == counts[0.3] == 2


def _layer(dropout: float = 0.0) -> MultiLoRALinear:
    torch.manual_seed(0)
    layer = MultiLoRALinear(torch.nn.Linear(16, 8), 2, rank=3, alpha=16.0, dropout=dropout, backend="torch")
    with torch.no_grad():
        layer.lora_b.normal_()
    return layer


@pytest.mark.parametrize("cast", ["to", "half", "double"])
def test_module_casts_keep_the_per_client_buffers_float32(cast):
    layer = _layer()
    layer.grad_sqnorm.fill_(0.125)
    dtype = {"to": torch.bfloat16, "half": torch.float16, "double": torch.float64}[cast]
    layer = layer.to(dtype) if cast == "to" else getattr(layer, cast)()
    assert layer.lora_a.dtype == dtype and layer.base.weight.dtype == dtype
    assert layer.scaling.dtype == torch.float32 and torch.equal(layer.scaling, torch.full((2,), 16.0 / 3))
    assert layer.grad_sqnorm.dtype == torch.float32 and (layer.grad_sqnorm == 0.125).all()
    assert list(dict(layer.named_buffers())) == ["ranks", "scaling", "trainable", "grad_sqnorm"]
    with layer.context.route(torch.tensor([0, 1, 0])):
        y = layer(torch.randn(3, 16, dtype=dtype))
    assert y.dtype == dtype


def test_autocast_computes_in_its_dtype_like_nn_linear():
    layer = _layer()
    x = torch.randn(5, 16)
    ids = torch.tensor([0, 1, -1, 1, 0])
    with torch.autocast("cpu", dtype=torch.bfloat16), layer.context.route(ids):
        y = layer(x)
        plain = layer.base(x)
    assert y.dtype == plain.dtype == torch.bfloat16
    # The same computation done by hand in bfloat16, outside autocast.
    bf = _layer().to(torch.bfloat16)
    with bf.context.route(ids):
        want = bf(x.to(torch.bfloat16))
    torch.testing.assert_close(y, want)
    y.float().sum().backward()
    assert layer.lora_a.grad is not None and layer.lora_a.grad.dtype == torch.float32


def test_activation_checkpointing_without_dropout_matches_plain_training():
    from torch.utils.checkpoint import checkpoint

    x, ids = torch.randn(4, 16), torch.tensor([0, 1, 0, 1])
    grads = []
    for use_checkpoint in (False, True):
        layer = _layer().train()
        with layer.context.route(ids):
            y = checkpoint(layer, x, use_reentrant=False) if use_checkpoint else layer(x)
            y.square().sum().backward()
        grads.append((layer.lora_a.grad, layer.lora_b.grad))
    for plain, ckpt in zip(*grads):
        assert torch.equal(plain, ckpt)


def test_activation_checkpointing_with_dropout_refuses_to_recompute():
    from torch.utils.checkpoint import checkpoint

    layer = _layer(dropout=0.5).train()
    with layer.context.route(torch.tensor([0, 1, 0, 1])):
        y = checkpoint(layer, torch.randn(4, 16), use_reentrant=False)
        with pytest.raises(RuntimeError, match="activation checkpointing.*dropout 0"):
            y.sum().backward()
    layer = _layer().train()
    with layer.context.route(torch.tensor([0, 1, 0, 1])):
        y = checkpoint(layer, torch.randn(4, 16), use_reentrant=False)
    with pytest.raises(RuntimeError, match="no routing is set.*activation checkpointing"):
        y.sum().backward()


def _checkpointed_causal_lm(order: str, dropout: float = 0.0):
    """A tiny causal LM with transformers' gradient checkpointing switched on ``order``: "enable-first"
    (before injection and ``train()``), "train-first" (``train()``, then enabled on the backbone) or
    "wrapper" (``train()``, then enabled through the MultiLoRAModel); and a counter of the forwards
    of a layer inside the checkpointed region."""
    from .tiny import tiny_causal_lm

    torch.manual_seed(0)
    backbone = tiny_causal_lm(64)
    enable = {"gradient_checkpointing_kwargs": {"use_reentrant": False}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # transformers 5 renames it activation_checkpointing_*
        if order == "enable-first":
            backbone.gradient_checkpointing_enable(**enable)
        model = inject_multi_lora(backbone, ["q_proj", "v_proj"], 2, rank=4, head_modules=None,
                                  backend="torch", dropout=dropout)
        randomize_banks(model)
        model.train()
        if order == "train-first":
            backbone.gradient_checkpointing_enable(**enable)
        elif order == "wrapper":
            model.gradient_checkpointing_enable(**enable)
    count = [0]
    layer = backbone.model.layers[0].self_attn  # inside the checkpointed forward
    layer.register_forward_pre_hook(lambda *_: count.__setitem__(0, count[0] + 1))
    return model, count


@pytest.mark.parametrize("order", ["enable-first", "train-first", "wrapper"])
def test_transformers_gradient_checkpointing_really_checkpoints_in_train_mode(order):
    """model.train() keeps the backbone's dropout off but must leave transformers' checkpointed layers
    in training mode (they only checkpoint then), whether checkpointing is enabled before or after
    train(); gradients equal those of a plain backward."""
    ids = torch.randint(3, 64, (2, 6), generator=torch.Generator().manual_seed(0))
    grads, calls = [], []
    for checkpointing in (False, True):
        model, count = _checkpointed_causal_lm(order if checkpointing else "off")
        with model.route(torch.tensor([0, 1])):
            model(input_ids=ids, labels=ids).loss.backward()
        calls.append(count[0])
        grads.append([p.grad.clone() for _, _, p in model.lora_banks()])
        # The backbone's own dropout stays off: only the checkpointed layers are in training mode.
        assert not any(m.training for m in model.backbone.modules() if isinstance(m, torch.nn.Dropout))
    assert calls == [1, 2]  # the checkpointed layer ran again in the backward (train-first before the fix: [1, 1])
    for plain, ckpt in zip(*grads):
        torch.testing.assert_close(plain, ckpt)


@pytest.mark.parametrize("order", ["enable-first", "train-first", "wrapper"])
def test_transformers_gradient_checkpointing_with_dropout_raises_in_either_order(order):
    model, count = _checkpointed_causal_lm(order, dropout=0.1)
    ids = torch.randint(3, 64, (2, 6), generator=torch.Generator().manual_seed(0))
    with model.route(torch.tensor([0, 1])):
        loss = model(input_ids=ids, labels=ids).loss
        with pytest.raises(RuntimeError, match="activation checkpointing.*dropout 0"):
            loss.backward()


def test_transformers_gradient_checkpointing_disabled_after_train_recomputes_nothing():
    model, count = _checkpointed_causal_lm("train-first")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        model.gradient_checkpointing_disable()
    ids = torch.randint(3, 64, (2, 6), generator=torch.Generator().manual_seed(0))
    with model.route(torch.tensor([0, 1])):
        model(input_ids=ids, labels=ids).loss.backward()
    assert count[0] == 1
    assert not any(m.training for m in model._checkpointable)
