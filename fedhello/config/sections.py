"""The sections of a run config (``model:``, ``data:``, ``tiers:`` ...): one dataclass each, with its defaults."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fedhello.fl.capacity import CapacityTiers

__all__ = ["ModelConfig", "PartitionConfig", "DataConfig", "TierConfig", "StrategyConfig", "AggregationConfig",
           "FisherConfig", "ClientsConfig", "LocalConfig", "EngineConfig", "AdaptiveClipConfig", "PrivacyConfig",
           "OPTIMIZERS", "TASKS", "ENGINES", "ENGINE_DTYPES"]

OPTIMIZERS = ("adamw", "sgd")
TASKS = ("classification", "causal_lm")
ENGINES = ("batched", "sequential")
ENGINE_DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass
class ModelConfig:
    """The backbone and its LoRA adapters.

    Attributes:
        name: Hub id, local folder, or an alias known to ``fedhello.models``.
        target_modules: module names to adapt; None for the model family's default.
        rank: LoRA rank r (HetLoRA's largest rank).
        alpha: LoRA alpha (scaling = alpha / rank).
        dropout: LoRA dropout probability.
        rank_scaling: scale of a HetLoRA client of rank r_c: ``client`` (alpha / r_c) or
            ``max`` (alpha / rank for every client: its slices keep the global model's scale).
        quantize: the frozen base's linear layers inside its blocks: ``none`` (full precision),
            ``nf4`` / ``fp4`` (bitsandbytes 4-bit, double quantization: QLoRA) or ``int8``
            (bitsandbytes LLM.int8()); embeddings, norms and heads stay in full precision.
            Needs the ``[quant]`` extra (bitsandbytes).
        compute_dtype: what 4-bit layers dequantize to and multiply in (QLoRA's
            ``bnb_4bit_compute_dtype``): ``auto`` (``engine.dtype``), ``float32``, ``bfloat16``
            or ``float16``; only with ``quantize: nf4`` or ``fp4``.
    """

    name: str | None = None
    target_modules: list[str] | None = None
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    rank_scaling: str = "client"
    quantize: str = "none"
    compute_dtype: str = "auto"


@dataclass
class PartitionConfig:
    """How the training data is split over clients (``fedhello.data.partition``).

    Attributes:
        kind: ``iid``, ``dirichlet`` or ``pathological``.
        alpha: Dirichlet concentration (dirichlet), > 0.
        classes_per_client: classes per client (pathological).
        min_size: fewest samples per client (dirichlet).
    """

    kind: str = "iid"
    alpha: float = 0.5
    classes_per_client: int = 2
    min_size: int = 1


@dataclass
class DataConfig:
    """Data source, held-out splits and client partition.

    Attributes:
        name: ``bbc_news``, ``fashion_mnist``, ``bbc_headlines`` (``task: causal_lm``: BBC News
            as story -> headline instructions), a Hub id, or None for local files.
        path: local file or folder (or the folder of a built-in set).
        split: split to read; ``test_split``: read the test set from this split instead of
            holding out ``test_fraction`` (then ``test_fraction`` is not used).
        text_column, image_column, label_column: input/label columns (found by name if None).
            With ``task: causal_lm`` the label column is optional: it only shapes the partition.
        prompt_column, response_column: instruction data (``task: causal_lm`` only): the loss
            covers the response tokens alone.
        chat_template: format each prompt with the tokenizer's chat template (a user turn).
        max_chunks: ``task: causal_lm`` plain text is cut into rows of ``max_length`` tokens; at
            most this many per text (1: truncation; None: all).
        max_samples: use a seeded random subset of this many samples (quick runs).
        max_length: tokens per text example.
        num_clients: clients in the population.
        test_fraction: share held out for global evaluation.
        proxy_fraction: share held out on the server for proxy-set Fisher scores.
    """

    name: str | None = None
    path: str | None = None
    split: str = "train"
    test_split: str | None = None
    text_column: str | None = None
    image_column: str | None = None
    label_column: str | None = None
    prompt_column: str | None = None
    response_column: str | None = None
    chat_template: bool = False
    max_chunks: int | None = None
    max_samples: int | None = None
    max_length: int = 128
    num_clients: int = 20
    test_fraction: float = 0.2
    proxy_fraction: float = 0.0
    partition: PartitionConfig = field(default_factory=PartitionConfig)


@dataclass
class TierConfig:
    """Capacity tiers: fractions of L (numbers or strings like ``"3/4"``) and population shares."""

    fractions: list[float | str] = field(default_factory=lambda: [0.5, 0.75, 1.0])
    shares: list[float | str] = field(default_factory=lambda: [1.0, 1.0, 1.0])

    def tiers(self) -> CapacityTiers:
        return CapacityTiers(tuple(self.fractions), tuple(self.shares))


@dataclass
class StrategyConfig:
    """Allocation strategy by registry name, with its options (see ``strategy_options(name)``)."""

    name: str = "fedhello"
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class AggregationConfig:
    """Aggregation weights (``samples``, ``uniform`` or ``norm``: each client by the Frobenius norm of
    its update ``B_c A_c``, as HetLoRA) and how HetLoRA's ranks are padded (``rank_normalize``:
    ``factors`` is HetLoRA's own zero-padding of the factors; ``all``, the default the published
    results used, pads the deltas; ``covering`` averages each rank slice over the clients that
    have it; ``fedhello.fl.aggregation.aggregate_rank_padded``). ``heads``: ``average`` the
    classification heads over the participants, or ``keep_initial``: never aggregate them, so the
    head stays the initial one for the whole run — a reproduction of the paper's released code for
    the ablation in docs/results.md, not a recommendation."""

    weighting: str = "samples"
    rank_normalize: str = "all"
    heads: str = "average"


@dataclass
class FisherConfig:
    """How the server estimates proxy-set Fisher scores (strategies with ``fisher_source: proxy``):
    ``standard`` (each proxy sample's squared loss-gradient norm per block, averaged over all of
    them) or ``released``: the paper's released code's estimate (the label's raw logit, only the
    first batch, per-tensor mean squares summed as Frobenius norms; ``fedhello.fl.released``) — a
    reproduction for the ablation in docs/results.md, not a recommendation."""

    estimator: str = "standard"


@dataclass
class ClientsConfig:
    """System heterogeneity: sampled clients that never send their update back.

    Attributes:
        dropout: probability that a sampled client never returns, drawn independently for each
            client and round (``fedhello.fl.dropout``); a list gives one probability per capacity
            tier (the order of ``tiers.fractions``), tying dropout to a client's tier.
        over_selection: sample ``ceil(cohort_size * (1 + over_selection))`` clients (at most the
            population) and aggregate the first ``cohort_size`` participants that return; the others
            are late and discarded, as production FL servers over-select.
    """

    dropout: float | list[float] = 0.0
    over_selection: float = 0.0

    @property
    def active(self) -> bool:
        """Whether any client can fail to return or be over-selected."""
        rates = self.dropout if isinstance(self.dropout, list) else [self.dropout]
        return any(rate > 0 for rate in rates) or self.over_selection > 0


@dataclass
class LocalConfig:
    """Local training of each client in a round.

    Attributes:
        epochs: passes over the client's data (when ``steps`` is None).
        steps: a fixed number of local steps instead.
        batch_size, lr, optimizer (``adamw``/``sgd``), weight_decay, momentum (sgd).
    """

    epochs: int = 1
    steps: int | None = None
    batch_size: int = 16
    lr: float = 5e-4
    optimizer: str = "adamw"
    weight_decay: float = 0.0
    momentum: float = 0.0


@dataclass
class EngineConfig:
    """Simulation engine: ``batched`` (client-parallel) or ``sequential``; clients per batched
    pass (``parallel``: an int, None = the whole cohort, or ``auto``: waves sized from a token
    budget, on CUDA from the free memory measured on the first wave); ``device`` (``auto``,
    ``cpu``, ``cuda``...); ``dtype`` the frozen backbone computes in (``auto``: float32 on CPU,
    bfloat16 on CUDA; adapters, optimizer state and aggregation stay float32)."""

    kind: str = "batched"
    parallel: int | str | None = None
    device: str = "auto"
    dtype: str = "auto"
    eval_batch_size: int = 64


@dataclass
class AdaptiveClipConfig:
    """Adaptive clipping (Andrew et al., 2021): the clip norm tracks ``target_quantile`` of the
    update norms, ``C <- C * exp(-learning_rate * (b - target_quantile))`` with ``b`` the share of
    members within the clip, counted with Gaussian noise of std ``count_noise_multiplier``
    (accounted; Andrew et al. suggest about cohort_size / 20)."""

    target_quantile: float = 0.5
    learning_rate: float = 0.2
    count_noise_multiplier: float | None = None


@dataclass
class PrivacyConfig:
    """Client-level differential privacy of the run (``fedhello.fl.privacy``); the unit of
    privacy is one client's whole data set.

    Attributes:
        noise_multiplier: sigma: the sum of the clipped updates gets N(0, sigma^2 clip_norm^2) per
            coordinate; 0 clips without noise (a robustness bound, no privacy claim). Exactly one
            of ``noise_multiplier`` and ``target_epsilon``.
        target_epsilon: calibrate sigma so that epsilon after ``rounds`` rounds is this.
        clip_norm: C, the L2 bound of one client's whole update (the first round's C with
            ``adaptive_clip``).
        delta: the delta epsilon is reported at, in (0, 1).
        fisher_clip: L2 bound of a client's Fisher score vector.
        fisher_noise_multiplier: the noise std on the sum of the clipped scores over ``fisher_clip``.
            Both are used (and accounted) only with a strategy that allocates from client-side
            Fisher scores (``strategy.options.fisher_source: client``), and such a strategy
            needs them under privacy; a suite may set them for every method.
        adaptive_clip: adaptive clipping, or None for a fixed C.
        secure_rng: draw the noise from the OS CSPRNG (not reproducible) instead of the run's
            seeded generator.
    """

    noise_multiplier: float | None = None
    target_epsilon: float | None = None
    clip_norm: float | None = None
    delta: float = 1e-5
    fisher_clip: float | None = None
    fisher_noise_multiplier: float | None = None
    adaptive_clip: AdaptiveClipConfig | None = None
    secure_rng: bool = False
