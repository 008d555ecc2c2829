"""Federated QLoRA rounds three ways over a bitsandbytes base: time per round and peak memory.

``bench_rounds.py --quantize nf4|fp4|int8 --patterns ...`` (or this script directly) trains one
round of N clients' LoRA adapters (causal LM, LoRA on the q/v projections, next-token loss on
random tokens, AdamW, ``--steps`` local steps of ``--batch`` sequences of ``--seq`` tokens) in
the three ways federated QLoRA is run:

* ``fedhello``    (a) ``ClientParallelEngine`` over one quantized base: the N clients' adapters
                  stacked in ``MultiLoRALinear`` banks, one batched forward/backward per step (one
                  wave of N), masked AdamW over the banks;
* ``peft-loop``   (b) one quantized base wrapped once by PEFT's LoRA, the clients trained one
                  after another; every client's adapters and AdamW state (``exp_avg``,
                  ``exp_avg_sq``, ``step``) are kept between clients, as a loop that carries them
                  over rounds does, and swapped into the one PeftModel and ``torch.optim.AdamW``;
* ``flowertune``  (c) Flower's FlowerTune pattern: one PEFT model per simulated client, each with
                  its own quantized base and AdamW, all N alive at once (their steps run one after
                  another in this process; Flower's parallel actors would only add activations).

Each (pattern, model, N) runs in a fresh subprocess so that peaks do not leak between cases. The
peak is the process's resident-set high-water mark (``VmHWM``, reset through
``/proc/self/clear_refs`` once the base and the clients' states are built) on CPU, and
``torch.cuda.max_memory_allocated`` on CUDA, over the timed round(s).

Models: ``smollm2`` (SmolLM2-135M-Instruct, its offline weights, quantized by
``fedhello.models.quantize``), ``llama-7b`` (the Llama-2-7B shape with random weights: d_model
4096, 32 blocks, MLP 11008, 32 heads, vocabulary 32,000, untied head) and ``tiny-llama`` (a toy of
the same builder for tests). The random models are built block by block, each linear layer
quantized as it is placed, so no full-precision copy of the model ever exists (a float32 7B is
27 GB). Quantizing on a CPU is slow (about 5 s for one 4096 x 11008 layer), so one random layer
of each shape is quantized and every block gets its own copy of it: time and memory do not
depend on the weights' values. Embeddings, norms and the output head stay unquantized in the
compute dtype, as QLoRA leaves them.

Analytic floor (printed beside every measurement; ``floor_bytes`` in the JSON)::

    floor = baseline + bases * base_bytes + clients * 3 * adapter_bytes + grad_clients * adapter_bytes
            + activations(wave_tokens)

* ``baseline``: the process's RSS after its imports, before anything is built (CPU; 0 on CUDA);
* ``base_bytes``: every tensor of the quantized model as stored (packed 4-bit weights with their
  scales, embeddings, norms, head);
* ``adapter_bytes``: one client's LoRA factors in float32 (r x (d_in + d_out) per target);
  ``3 *``: the factors and AdamW's two moments, kept for every client; the gradients for the
  clients training at once;
* ``activations(T)``: what a backward through the model must keep for T tokens, in the compute
  dtype, per block and token: the block input and the attention residual sum (for the two
  RMSNorms), the normed input (for the LoRA weight gradients of q and v), q, k, v and the
  attention output (for attention's backward), the MLP's gate output, its SiLU and the up
  output (3 x d_mlp); plus the final norm's input and the float32 log-softmax over the
  vocabulary per token, and one frozen layer's transient dequantized weight (the largest).
  Implementations may keep more (e.g. transformers' RMSNorm keeps a float32 copy of its input, which
  fedhello's frozen norms recompute instead; the loss's float32 transients over the vocabulary).

Per pattern: (a) one base, N clients' states, N clients' gradients, a wave of N clients' tokens;
(b) one base, N clients' states, one client's gradients and tokens; (c) N bases, N states,
N gradients, one client's tokens. With ``--loop-clients K`` the PEFT loop trains only K of the N
clients (every client's state still allocated); its round time is then extrapolated as
``N / K`` times the measured one and labelled so. For ``llama-7b`` the FlowerTune pattern runs at
N = 1 only; its peak at N is reported as N times that (``scaled_from_n1``). On CPU a case whose
estimated floor (from the first measured case of its model) times 1.2 exceeds the free memory
(``MemAvailable``) is skipped and says so.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from _common import finite, int_list, name_list, package_versions, results_path, run_metadata, write_json
from report import qlora_table

PATTERNS = ("fedhello", "peft-loop", "flowertune")
MODELS = ("tiny-llama", "smollm2", "llama-7b")
SCALED_FLOWERTUNE = ("llama-7b",)  # (c) measured at N = 1 only, scaled to N
TARGETS = ["q_proj", "v_proj"]
RESULT_TAG = "QLORA_RESULT "
MEMORY_MARGIN = 1.2  # a CPU case starts only when MemAvailable exceeds this times its estimated floor
GLOBAL_NOISE = 0.05  # the global adapters: init plus N(0, 0.05^2), so lora_B != 0 (a mid-training state)
# Llama shapes built with random weights (keys of transformers.LlamaConfig).
RANDOM_LLAMAS = {
    "llama-7b": {"vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
                 "num_attention_heads": 32, "num_key_value_heads": 32},
    "tiny-llama": {"vocab_size": 128, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
                   "num_attention_heads": 4, "num_key_value_heads": 2},
}


@dataclass(frozen=True)
class PatternCase:
    """One subprocess: a pattern trained for one round of ``n`` clients on ``model``.

    Attributes:
        run_clients: clients the PEFT loop actually trains (None: all ``n``).
        warmup: untimed rounds before the timed one.
    """

    pattern: str
    model: str
    n: int
    quantize: str
    dtype: str
    device: str
    seq: int
    batch: int
    steps: int
    rank: int
    alpha: float
    lr: float
    seed: int
    warmup: int
    run_clients: int | None = None
    threads: int | None = None


# ------------------------------------------------------------------------------------------ memory


def rss_bytes() -> tuple[int, int]:
    """(current RSS, high-water mark) of this process in bytes, from ``/proc/self/status``."""
    values = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                key, value = line.split(":", 1)
                values[key] = int(value.split()[0]) * 1024
    return values["VmRSS"], values["VmHWM"]


def reset_peak(device: torch.device) -> None:
    """Start a new peak: CUDA's peak statistics, or the RSS high-water mark (``clear_refs`` 5)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")


def peak_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device)
    return rss_bytes()[1]


def model_bytes(model: nn.Module) -> int:
    """Bytes of every tensor ``model`` holds as stored: bitsandbytes layers at their packed size
    (scales included), everything else by its parameters and buffers."""
    from fedhello.nn.quantized import quantization_of, quantized_bytes

    total, inside = 0, set()
    for module in model.modules():
        if quantization_of(module) is not None:
            total += quantized_bytes(module)
            inside.update(id(t) for t in (*module.parameters(), *module.buffers()))
    seen = set()
    for t in (*model.parameters(), *model.buffers()):
        if id(t) not in inside and id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def adapter_bytes(config, rank: int) -> int:
    """One client's LoRA factors on q/v of every block, float32: r x (d_in + d_out) per target."""
    d = config.hidden_size
    kv = config.num_key_value_heads * (d // config.num_attention_heads)
    per_block = rank * (d + d) + rank * (d + kv)
    return 4 * per_block * config.num_hidden_layers


def activation_bytes(config, tokens: int, dtype: torch.dtype, transient: int) -> int:
    """What a backward through the LoRA'd Llama must keep for ``tokens`` tokens (module doc), plus
    ``transient`` bytes (one layer's dequantized weight)."""
    d, m, v = config.hidden_size, config.intermediate_size, config.vocab_size
    kv = config.num_key_value_heads * (d // config.num_attention_heads)
    size = torch.empty((), dtype=dtype).element_size()
    per_block = 5 * d + 2 * kv + 3 * m  # x, x', normed x, q, attention output; k, v; gate, silu, up
    head = d * size + v * 4  # final norm input; float32 log-softmax for the loss
    return tokens * (config.num_hidden_layers * per_block * size + head) + transient


def largest_dequantized(config, dtype: torch.dtype) -> int:
    return config.hidden_size * config.intermediate_size * torch.empty((), dtype=dtype).element_size()


def floor_terms(pattern: str, n: int, tokens_per_client: int) -> dict[str, int]:
    """How many bases, client states, client gradients and wave tokens ``pattern`` needs (module doc)."""
    if pattern == "fedhello":
        return {"bases": 1, "states": n, "grads": n, "wave_tokens": n * tokens_per_client}
    if pattern == "peft-loop":
        return {"bases": 1, "states": n, "grads": 1, "wave_tokens": tokens_per_client}
    return {"bases": n, "states": n, "grads": n, "wave_tokens": tokens_per_client}


# ------------------------------------------------------------------------------------------ models


def copy_quantized(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` whose bitsandbytes 4-bit layers each own one quantization state.

    ``copy.deepcopy`` alone is not enough with bitsandbytes 0.50: ``Params4bit.__deepcopy__`` copies
    the weight's ``quant_state`` outside deepcopy's memo and keeps ``weight.module`` pointing at the
    *original* layer, so every copied layer holds a second copy of its scales (``module.quant_state``,
    never read while the weight has its own) and keeps the original layer alive: 150 MiB that no real
    model loaded from a checkpoint holds, at the 7B shape. Relinking the copy frees both.
    """
    new = copy.deepcopy(module)
    for layer in new.modules():
        weight = getattr(layer, "weight", None)
        if getattr(weight, "quant_state", None) is not None and hasattr(weight, "module"):
            weight.module = layer
            layer.quant_state = weight.quant_state
    return new


def random_quantized_llama(name: str, quantize: str, dtype: torch.dtype, device: torch.device,
                           seed: int) -> nn.Module:
    """``LlamaForCausalLM`` of the shape ``name`` (``RANDOM_LLAMAS``), random weights, its blocks'
    linear layers quantized, built block by block on ``device`` (module doc: one random layer of
    each shape is quantized, each block holds its own copy).

    The skeleton is created on the meta device (no memory); embeddings, norms, the head and the
    rotary buffers are then materialised in ``dtype``, and every block's linears replaced by
    bitsandbytes layers as the block is reached.
    """
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    from fedhello.nn.quantized import quantize_linear

    config = LlamaConfig(**RANDOM_LLAMAS[name], max_position_embeddings=4096, rms_norm_eps=1e-5,
                         tie_word_embeddings=False, pad_token_id=0)
    gen = torch.Generator(device=device).manual_seed(seed)

    def normal(*shape: int) -> torch.Tensor:
        return torch.empty(shape, device=device, dtype=dtype).normal_(0.0, 0.02, generator=gen)

    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    inner = model.model
    inner.embed_tokens = nn.Embedding.from_pretrained(normal(config.vocab_size, config.hidden_size), freeze=True,
                                                      padding_idx=config.pad_token_id)
    model.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False, device=device, dtype=dtype)
    model.lm_head.weight = nn.Parameter(normal(config.vocab_size, config.hidden_size), requires_grad=False)
    inner.norm.weight = nn.Parameter(torch.ones(config.hidden_size, device=device, dtype=dtype), requires_grad=False)
    with torch.device(device):
        inner.rotary_emb = LlamaRotaryEmbedding(config=config)
    prototypes: dict[tuple[int, int], nn.Module] = {}  # (out, in) -> the quantized layer every block copies
    for block in inner.layers:
        for norm in (block.input_layernorm, block.post_attention_layernorm):
            norm.weight = nn.Parameter(torch.ones(config.hidden_size, device=device, dtype=dtype),
                                       requires_grad=False)
        for name_, module in list(block.named_modules()):
            if type(module) is not nn.Linear:
                continue
            shape = (module.out_features, module.in_features)
            if shape not in prototypes:
                linear = nn.Linear(shape[1], shape[0], bias=False, device="meta")
                linear.weight = nn.Parameter(normal(*shape).float(), requires_grad=False)
                prototypes[shape] = quantize_linear(linear, quantize, dtype)
                del linear
            block.set_submodule(name_, copy_quantized(prototypes[shape]))
    # The flag transformers' bitsandbytes loading sets; PEFT reads it to pick its bitsandbytes LoRA layers.
    setattr(model, "is_loaded_in_8bit" if quantize == "int8" else "is_loaded_in_4bit", True)
    return model.eval().requires_grad_(False)


def load_quantized(case: PatternCase, device: torch.device) -> nn.Module:
    """The case's causal LM on ``device``: its blocks' linears quantized, the rest in the compute dtype."""
    dtype = getattr(torch, case.dtype)
    if case.model in RANDOM_LLAMAS:
        return random_quantized_llama(case.model, case.quantize, dtype, device, case.seed)
    from fedhello.models import load_backbone
    from fedhello.models.quantize import quantize_backbone

    model = load_backbone("SmolLM2-135M-Instruct", task="causal-lm").float().eval().to(device)
    quantize_backbone(model, case.quantize, dtype, "--quantize")
    for value in (*model.parameters(), *model.buffers()):  # what set_compute_dtype does for the engine
        if value.is_floating_point() and value.dtype != dtype and value.dtype in (torch.float32, torch.bfloat16,
                                                                                   torch.float16):
            value.data = value.data.to(dtype)
    return model.requires_grad_(False)


def client_data(case: PatternCase, vocab: int) -> list[dict[str, torch.Tensor]]:
    """Each client's ``steps * batch`` random sequences (labels = input ids), seeded per client."""
    out = []
    for c in range(case.n):
        gen = torch.Generator().manual_seed(case.seed * 1_000_003 + c)
        ids = torch.randint(1, vocab, (case.steps * case.batch, case.seq), generator=gen)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
    return out


# ---------------------------------------------------------------------------------------- patterns


class FedhelloRound:
    """(a) ``ClientParallelEngine`` over one quantized base, one wave of N clients."""

    def __init__(self, base: nn.Module, case: PatternCase, data: list[dict[str, torch.Tensor]]) -> None:
        from fedhello.fl.engine import ClientParallelEngine, LocalTask, LocalTrainingConfig
        from fedhello.nn import inject_multi_lora

        self.model = inject_multi_lora(base, TARGETS, num_clients=case.n, rank=case.rank, alpha=case.alpha,
                                       head_modules=None, seed=case.seed)
        cfg = LocalTrainingConfig(steps=case.steps, batch_size=case.batch, optimizer="adamw", lr=case.lr)
        self.engine = ClientParallelEngine(self.model, cfg, parallel=case.n, dtype=getattr(torch, case.dtype))
        gen = torch.Generator().manual_seed(case.seed)
        self.global_state = {k: (v + GLOBAL_NOISE * torch.randn(v.shape, generator=gen).to(v)).contiguous()
                             for k, v in self.model.client_state(0).items()}
        blocks = torch.ones(self.model.num_blocks, dtype=torch.bool)
        self.tasks = [LocalTask(client=c, data=d, trainable_blocks=blocks, seed=case.seed * 100_003 + c)
                      for c, d in enumerate(data)]

    def run(self) -> int:
        """One round; returns the clients trained."""
        results = self.engine.train(self.global_state, self.tasks)
        return len(results)


def _init_adamw_state(optimizer: torch.optim.AdamW) -> list[dict[str, torch.Tensor]]:
    """Allocate AdamW's state for every parameter now (as after a first step), as a client whose
    optimizer is alive between rounds holds it; returns the states in parameter order."""
    states = []
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}
            optimizer.state[p] = state
            states.append(state)
    return states


def _peft_model(base: nn.Module, case: PatternCase) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    from fedhello.nn.quantized import quantization_of

    config = LoraConfig(r=case.rank, lora_alpha=case.alpha, lora_dropout=0.0, target_modules=TARGETS, bias="none")
    model = get_peft_model(base, config).eval()
    # Dropout off (eval) but bitsandbytes layers in training mode, as model.train() leaves them while
    # a PEFT user trains (bench_rounds' PEFT loop does the same).
    for module in model.modules():
        if quantization_of(module) is not None:
            module.train()
    return model


def _peft_step(model: nn.Module, optimizer: torch.optim.Optimizer, data: dict[str, torch.Tensor],
               case: PatternCase, device: torch.device) -> None:
    """The client's local steps: transformers' next-token loss, AdamW."""
    dtype = getattr(torch, case.dtype)
    for step in range(case.steps):
        rows = slice(step * case.batch, (step + 1) * case.batch)
        batch = {k: v[rows].to(device) for k, v in data.items()}
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


class PeftLoopRound:
    """(b) one PeftModel over one quantized base; clients one after another, each client's adapters
    and AdamW state kept between clients and swapped in."""

    def __init__(self, base: nn.Module, case: PatternCase, data: list[dict[str, torch.Tensor]],
                 device: torch.device) -> None:
        self.case, self.data, self.device = case, data, device
        self.model = _peft_model(base, case)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=case.lr, weight_decay=0.0)
        gen = torch.Generator().manual_seed(case.seed)
        global_state = [p.detach() + GLOBAL_NOISE * torch.randn(p.shape, generator=gen).to(p) for p in self.params]
        # Every client's adapters and optimizer state, alive for the whole round.
        self.adapters = [[g.clone() for g in global_state] for _ in range(case.n)]
        self.opt_states = []
        for _ in range(case.n):
            self.opt_states.append(_init_adamw_state(self.optimizer))
        self.run_clients = case.n if case.run_clients is None else min(case.n, case.run_clients)

    def run(self) -> int:
        for c in range(self.run_clients):
            with torch.no_grad():
                for p, a in zip(self.params, self.adapters[c]):
                    p.copy_(a)
            for p, state in zip(self.params, self.opt_states[c]):
                self.optimizer.state[p] = state
            _peft_step(self.model, self.optimizer, self.data[c], self.case, self.device)
            with torch.no_grad():
                for p, a in zip(self.params, self.adapters[c]):
                    a.copy_(p)
        return self.run_clients


class FlowerTuneRound:
    """(c) one PEFT model with its own quantized base and AdamW per client, all alive."""

    def __init__(self, base: nn.Module, case: PatternCase, data: list[dict[str, torch.Tensor]],
                 device: torch.device) -> None:
        self.case, self.data, self.device = case, data, device
        bases = [base] + [copy_quantized(base) for _ in range(case.n - 1)]
        self.models, self.optimizers = [], []
        for b in bases:
            model = _peft_model(b, case)
            optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=case.lr,
                                          weight_decay=0.0)
            _init_adamw_state(optimizer)
            self.models.append(model)
            self.optimizers.append(optimizer)

    def run(self) -> int:
        for model, optimizer, data in zip(self.models, self.optimizers, self.data):
            _peft_step(model, optimizer, data, self.case, self.device)
        return len(self.models)


# ------------------------------------------------------------------------------------------ worker


def run_worker(case: PatternCase) -> dict:
    """Build the case's base and pattern, run its rounds; the measurement record (this process)."""
    device = torch.device(case.device)
    if case.threads:
        torch.set_num_threads(case.threads)
    # Everything a case imports, before the baseline is read (imports are in the floor's baseline).
    import bitsandbytes  # noqa: F401
    import peft  # noqa: F401
    import transformers.models.llama.modeling_llama  # noqa: F401

    import fedhello.fl.engine  # noqa: F401
    import fedhello.models  # noqa: F401

    baseline = rss_bytes()[0] if device.type == "cpu" else 0
    t0 = time.perf_counter()
    base = load_quantized(case, device)
    config = base.config
    base_bytes = model_bytes(base)
    data = client_data(case, config.vocab_size)
    if case.pattern == "fedhello":
        impl = FedhelloRound(base, case, data)
    elif case.pattern == "peft-loop":
        impl = PeftLoopRound(base, case, data, device)
    else:
        impl = FlowerTuneRound(base, case, data, device)
    del base
    build_s = time.perf_counter() - t0
    build_peak = peak_bytes(device)
    held = rss_bytes()[0] if device.type == "cpu" else torch.cuda.memory_allocated(device)
    reset_peak(device)
    for _ in range(case.warmup):
        impl.run()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    trained = impl.run()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    round_s = time.perf_counter() - start
    peak = peak_bytes(device)

    dtype = getattr(torch, case.dtype)
    terms = floor_terms(case.pattern, case.n, case.batch * case.seq)
    per_client = adapter_bytes(config, case.rank)
    transient = largest_dequantized(config, dtype)
    activations = activation_bytes(config, terms["wave_tokens"], dtype, transient)
    floor = (baseline + terms["bases"] * base_bytes + terms["states"] * 3 * per_client
             + terms["grads"] * per_client + activations)
    record = {
        **asdict(case), "clients_trained": trained, "build_s": build_s, "round_s": round_s,
        "round_s_full": round_s * case.n / trained, "round_s_extrapolated": trained < case.n,
        "peak_bytes": peak, "build_peak_bytes": build_peak, "held_before_round_bytes": held,
        "baseline_bytes": baseline, "base_bytes": base_bytes, "adapter_bytes_per_client": per_client,
        "activation_floor_bytes": activations, "transient_bytes": transient,
        "activation_bytes_per_token": activation_bytes(config, 1, dtype, 0), "floor_terms": terms, "floor_bytes": floor,
        "peak_over_floor": peak / floor,
    }
    return record


def run_case(case: PatternCase, timeout_s: float) -> dict:
    """``case`` in a fresh Python process (this file with ``--worker``); its record, or a failed one."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1]),
         os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep), "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(asdict(case))]
    try:
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {**asdict(case), "status": "timeout", "note": f"no result within {timeout_s:g} s"}
    lines = [line for line in done.stdout.splitlines() if line.startswith(RESULT_TAG)]
    if done.returncode != 0 or not lines:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        return {**asdict(case), "status": "failed", "note": f"exit {done.returncode}: " + " | ".join(tail)}
    return {**json.loads(lines[-1][len(RESULT_TAG):]), "status": "ok"}


def estimated_floor(ref: dict, case: PatternCase) -> int:
    """The floor of ``case`` from the pieces measured by an earlier case of the same model (``ref``)."""
    terms = floor_terms(case.pattern, case.n, case.batch * case.seq)
    return (ref["baseline_bytes"] + terms["bases"] * ref["base_bytes"]
            + (3 * terms["states"] + terms["grads"]) * ref["adapter_bytes_per_client"]
            + terms["wave_tokens"] * ref["activation_bytes_per_token"] + ref["transient_bytes"])


def available_bytes() -> int:
    """``MemAvailable`` of ``/proc/meminfo`` in bytes."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("/proc/meminfo has no MemAvailable line")


def scaled_flowertune(n1: dict, n: int) -> dict:
    """(c) at ``n`` clients as ``n`` times its measured N = 1 peak and time (not run)."""
    return {**n1, "n": n, "status": "scaled", "scaled_from_n1": True, "peak_bytes": n * n1["peak_bytes"],
            "round_s": None, "round_s_full": n * n1["round_s_full"], "round_s_extrapolated": True,
            "floor_bytes": n * n1["floor_bytes"], "peak_over_floor": n1["peak_over_floor"],
            "note": "N x the measured N = 1 peak (one process per client, not run)"}


# ------------------------------------------------------------------------------------------- table


# --------------------------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Federated QLoRA round: fedhello batched vs PEFT loop vs FlowerTune "
                                            "(one PEFT model per client); time and peak memory per case.")
    p.add_argument("--quantize", choices=("nf4", "fp4", "int8"), required=True, help="the bitsandbytes base")
    p.add_argument("--patterns", type=name_list(PATTERNS), default=list(PATTERNS),
                   help=f"subset of {','.join(PATTERNS)} (default all)")
    p.add_argument("--models", type=name_list(MODELS), default=["smollm2"], help=f"subset of {','.join(MODELS)}")
    p.add_argument("--n", type=int_list, default=[1, 8, 32], help="numbers of clients (default 1,8,32)")
    p.add_argument("--seq", type=int, default=16, help="tokens per sequence (default 16)")
    p.add_argument("--batch", type=int, default=1, help="sequences per client per step (default 1)")
    p.add_argument("--steps", type=int, default=1, help="local steps (default 1)")
    p.add_argument("--rank", type=int, default=16, help="LoRA rank on q/v (default 16)")
    p.add_argument("--alpha", type=float, default=32.0, help="LoRA alpha (default 32)")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                   help="compute dtype of the base (4-bit dequantization, embeddings, norms, head)")
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    p.add_argument("--warmup", type=int, help="untimed rounds before the timed one (default 1 on CUDA, 0 on CPU)")
    p.add_argument("--loop-clients", type=int,
                   help="the PEFT loop trains only this many of the N clients (all states allocated); its "
                        "round time is extrapolated to N and marked so")
    p.add_argument("--timeout-s", type=float, default=3600.0, help="per case (default 3600)")
    p.add_argument("--threads", type=int, help="CPU intra-op threads of every case")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, help="JSON path (default benchmarks/results/qlora-<device>-<date>.json)")
    return p


def plan_cases(args: argparse.Namespace, device: torch.device) -> list[PatternCase]:
    warmup = args.warmup if args.warmup is not None else (1 if device.type == "cuda" else 0)
    cases = []
    for model in args.models:
        for n in args.n:
            for pattern in args.patterns:
                if pattern == "flowertune" and model in SCALED_FLOWERTUNE and n != 1:
                    continue  # reported from its N = 1 case
                cases.append(PatternCase(pattern=pattern, model=model, n=n, quantize=args.quantize, dtype=args.dtype,
                                         device=device.type, seq=args.seq, batch=args.batch, steps=args.steps,
                                         rank=args.rank, alpha=args.alpha, lr=args.lr, seed=args.seed,
                                         warmup=warmup, threads=args.threads,
                                         run_clients=args.loop_clients if pattern == "peft-loop" else None))
    return cases


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) == 2 and argv[0] == "--worker":  # one case, in the process run_case started
        record = run_worker(PatternCase(**json.loads(argv[1])))
        print(RESULT_TAG + json.dumps(finite(record)), flush=True)
        return 0
    parser = build_parser()
    args = parser.parse_args(argv)
    for key in ("seq", "batch", "steps", "rank"):
        if getattr(args, key) < 1:
            parser.error(f"--{key}: expected >= 1, got {getattr(args, key)}")
    if any(n < 1 for n in args.n):
        parser.error(f"--n: expected numbers >= 1, got {args.n}")
    if args.loop_clients is not None and args.loop_clients < 1:
        parser.error(f"--loop-clients: expected >= 1, got {args.loop_clients}")
    from fedhello.quantization import bitsandbytes_problem

    problem = bitsandbytes_problem()
    if problem is not None:
        parser.error(f"--quantize: {args.quantize} needs bitsandbytes, but {problem}")
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else "cpu" if args.device == "auto" else args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available")
    if device.type == "cpu" and not os.path.exists("/proc/self/clear_refs"):
        parser.error("--device cpu: the peak RSS is read from /proc (Linux only)")

    cases = plan_cases(args, device)
    meta = {**run_metadata(device, argv), **package_versions(("transformers", "peft", "bitsandbytes")),
            "settings": {k: v for k, v in vars(args).items() if k != "out"},
            "definitions": {"peak_bytes": "CUDA: max_memory_allocated over the timed round(s); CPU: the process's "
                                          "RSS high-water mark over them (reset after the build)",
                            "floor_bytes": "baseline + bases * base_bytes + states * 3 * adapter_bytes + grads * "
                                           "adapter_bytes + activation_floor_bytes (floor_terms per pattern; "
                                           "benchmarks/qlora_patterns.py doc)",
                            "round_s_full": "round_s * n / clients_trained (extrapolated when "
                                            "round_s_extrapolated)"}}
    out = args.out or results_path("qlora", meta["device_slug"], False)
    doc = {"schema": 1, "meta": meta, "complete": False, "cases": []}
    print(f"{meta['device']} | {len(cases)} case(s) | {args.quantize} {args.dtype} seq {args.seq} batch {args.batch} "
          f"steps {args.steps} r {args.rank} | -> {out}", flush=True)
    write_json(doc, out)
    start = time.monotonic()
    refs: dict[str, dict] = {}  # model -> its first measured record (the pieces of later floors)
    for i, case in enumerate(cases, 1):
        need = (MEMORY_MARGIN * estimated_floor(refs[case.model], case)
                if device.type == "cpu" and case.model in refs else 0)
        free = available_bytes() if need else 0
        if need > free:
            # A case larger than the machine's free memory would be killed, or take others with it.
            record = {**asdict(case), "status": "skipped",
                      "note": f"needs about {need / 2**30:.1f} GiB ({MEMORY_MARGIN:g} x its floor), "
                              f"{free / 2**30:.1f} GiB available"}
        else:
            record = run_case(case, args.timeout_s)
        if record["status"] == "ok":
            refs.setdefault(case.model, record)
        doc["cases"].append(finite(record))
        if case.pattern == "flowertune" and case.model in SCALED_FLOWERTUNE and record["status"] == "ok":
            doc["cases"].extend(finite(scaled_flowertune(record, n)) for n in args.n if n != 1)
        write_json(doc, out)
        extra = (f" {record['round_s']:.2f} s, peak {record['peak_bytes'] / 2**30:.3f} GiB, floor "
                 f"{record['floor_bytes'] / 2**30:.3f} GiB" if record["status"] == "ok" else f" {record.get('note')}")
        print(f"[{i}/{len(cases)}] {case.model} N={case.n} {case.pattern}: {record['status']}{extra}", flush=True)
    doc["complete"] = True
    doc["elapsed_s"] = round(time.monotonic() - start, 3)
    write_json(doc, out)
    print("\n" + qlora_table(doc["cases"], device.type == "cuda"))
    print(f"\nwrote {out}")
    return 0 if all(r["status"] in ("ok", "scaled") for r in doc["cases"]) else 1


if __name__ == "__main__":
    sys.exit(main())
