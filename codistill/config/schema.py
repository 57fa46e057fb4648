"""The run configuration's schema: one small frozen dataclass per section.

`load_config` (in `builder.py`) builds them from plain YAML data and checks every key against
these fields, so a typo is an error naming the key path and the keys that are allowed, never
a silently ignored setting. Range checks live in each dataclass's `__post_init__` and raise
`ConfigError(field, message)`; the builder prefixes the path (e.g. `method.temperature`).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from codistill.config.method import MethodConfig, registered_with
from codistill.config.runs_of_runs import BornAgainSettings, TuneSettings
from codistill.config.tracking import TrackingConfig
from codistill.config.train import TrainConfig
from codistill.data import DATASETS
from codistill.errors import ConfigError, check
from codistill.metrics import BITS
from codistill.models import MODELS


# A run's name is one folder under the storage path: never a path that leaves it.
RUN_NAME = re.compile(r"[A-Za-z0-9_+=][A-Za-z0-9._+=-]*")


@dataclass(frozen=True, kw_only=True, slots=True)
class OptimizerConfig:
    name: Literal["sgd", "adam", "adamw"] = "adam"
    """Optimizer. SGD uses `momentum` and `nesterov`."""
    lr: float = 1e-2
    """Peak learning rate."""
    momentum: float = 0.9
    weight_decay: float = 0.0
    nesterov: bool = False
    schedule: Literal["constant", "cosine", "multistep"] = "constant"
    """Learning-rate schedule over `train.steps` (multistep: ÷10 at each of `milestones`)."""
    milestones: tuple[float, ...] = (0.5, 0.75)
    """For `multistep`: fractions of training at which the rate drops tenfold."""
    warmup_steps: int = 0
    """Linear warm-up from 0 to `lr` over this many steps."""

    def __post_init__(self):
        check(self.lr > 0, "lr", f"must be > 0, got {self.lr}")
        check(0 <= self.momentum < 1, "momentum", f"must be in [0, 1), got {self.momentum}")
        check(self.weight_decay >= 0, "weight_decay", f"must be >= 0, got {self.weight_decay}")
        check(self.warmup_steps >= 0, "warmup_steps", f"must be >= 0, got {self.warmup_steps}")
        check(all(0 < m < 1 for m in self.milestones), "milestones",
               f"must be fractions in (0, 1), got {list(self.milestones)}")


@dataclass(frozen=True, kw_only=True, slots=True)
class PeerSpec:
    model: str
    """Registered model name (see `codistill.models.MODELS`)."""
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    model_args: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments of the model's builder, e.g. `{width: 256, depth: 4}` for `gpt`."""
    workers: int | None = None
    """Ray runner, methods whose peers each have a Ray Train run (codistill): this peer's data-parallel (DDP)
    workers, e.g. 4 for a large peer beside a small one on 1. None: `ray.workers_per_peer`."""
    resources: dict[str, float] | None = None
    """Ray runner, peers that each have a Ray Train run: what this peer reserves in all, split evenly over its
    workers, e.g. {GPU: 4}. None: `ray.resources_per_peer`."""

    def __post_init__(self):
        check(self.workers is None or self.workers >= 1, "workers", f"must be >= 1, got {self.workers}")
        for name, amount in (self.resources or {}).items():
            check(amount >= 0, f"resources.{name}", f"must be >= 0, got {amount}")
        MODELS.get(self.model, "model")
        from codistill.models.registry import check_model_args

        problem = check_model_args(self.model, self.model_args)
        check(problem is None, "model_args", problem or "")


# Generation keeps 160 bytes an example (40 float32s), made a million at a time (data/loaders.py),
# a chunk peaking at ~1,500 bytes an example (~4,600/s, 2-core AMD EPYC): 10M is ~3 GB, ~40 min.
GENERATED_EXAMPLES_LIMIT, GENERATED_KEPT_BYTES, GENERATED_CHUNK_PEAK = 10_000_000, 160, 1_000_000 * 1_500
generated_bytes = lambda n: n * GENERATED_KEPT_BYTES + min(n * 1_500, GENERATED_CHUNK_PEAK)  # noqa: E731 — peak memory


@dataclass(frozen=True, kw_only=True, slots=True)
class DataConfig:
    name: str = "mnist1d"
    """Registered data set (see `codistill.data.DATASETS`)."""
    root: str = "~/.cache/codistill"
    """Where data sets are cached or found (CIFAR: the torchvision folder)."""
    batch_size: int = 128
    eval_batch_size: int = 1000
    shard: bool = False
    """Give each peer a disjoint part of the training set (codistillation as parallelism)."""
    train_subset: int = 0
    """Use only the first N training examples (0: all). For quick experiments and tests."""
    augment: bool = True
    """Standard augmentation where the data set defines one (CIFAR: crop + flip)."""
    download: bool = False
    """Allow torchvision to download CIFAR when `root` does not have it."""
    validation: float = 0.0
    """Hold out this fraction of the training set and evaluate on it instead of the test set
    (a validation split for tuning; the same examples in every run). 0: train on all, test on the test set."""
    max_passes: float = 0.0
    """The most passes over the training set (each peer's part when `shard`) a run may make: one
    whose `train.steps` × `batch_size` would draw more is refused before it trains — 1: no
    example or text window is seen twice (Anil et al.'s regime). 0: no limit."""
    path: str | None = None
    """`text`: the text file or folder of text files to train on. `hf_text`: a JSONL, Parquet,
    Arrow or text file, or a folder of one kind of them (read by `datasets.load_dataset`)."""
    text_field: str = "text"
    """`hf_text`: the column that holds each document's text."""
    tokenizer: Literal["bpe", "bytes"] | dict[str, str] = "bpe"
    """Text: a byte-level BPE (`tokenizers`) trained on at most 8 MB of the training split, plain
    bytes (not `hf_text`), or `{path: DIR}`: a local tokenizer folder (`AutoTokenizer`)."""
    vocab_size: int = 1024
    """Text, bpe: the vocabulary the BPE is trained to."""
    context: int = 128
    """Text: tokens per window (an example is a window; its labels are the next tokens)."""
    test_windows: int = 64
    """Text: at most this many windows of the test split (evenly spaced) are evaluated."""
    test_examples: int = 0
    """Data sets that generate their examples (mnist1d): a test set of this many examples from
    the same distribution, for figures with less evaluation noise (10,000 on MNIST-1D: a
    standard error of 0.24 points at 94%, against 0.75 with the default 1000). 0: the data
    set's own test split."""
    train_examples: int = 0
    """Data sets that generate their examples (mnist1d): a training set of this many examples
    from the same distribution (e.g. 500,000, so that a run sees each example about once: the
    data-rich regime). 0: the data set's own training split (MNIST-1D: 4,000)."""

    def __post_init__(self):
        DATASETS.get(self.name, "name")
        check(self.vocab_size >= 2, "vocab_size", f"must be >= 2, got {self.vocab_size}")
        check(self.context >= 1, "context", f"must be >= 1, got {self.context}")
        check(self.test_windows >= 1, "test_windows", f"must be >= 1, got {self.test_windows}")
        for key, split in (("test_examples", "test"), ("train_examples", "training")):
            value = getattr(self, key)
            check(value >= 0, key, f"must be >= 0 (0: the data set's own {split} split), got {value}")
            check(not value or DATASETS[self.name].generates, key,
                  f"data set {self.name!r} has fixed splits; data sets that generate theirs: "
                  + ", ".join(n for n, e in DATASETS.items() if e.generates))
            check(value <= GENERATED_EXAMPLES_LIMIT, key,
                  f"at most {GENERATED_EXAMPLES_LIMIT:,} examples are generated (~{GENERATED_KEPT_BYTES} bytes of "
                  f"memory each, and ~{GENERATED_CHUNK_PEAK / 1e9:.1f} GB while a chunk of a million is made: "
                  f"{generated_bytes(GENERATED_EXAMPLES_LIMIT) / 1e9:,.0f} GB); {value:,} would take about "
                  f"{generated_bytes(value) / 1e9:,.0f} GB")
        if self.name == "text":
            from codistill.data.text import text_files
            check(self.path is not None, "path", "is required for data set 'text': a text file or a folder of text files")
            text_files(self.path, key="path")  # a ConfigError naming data.path when it does not exist or holds no text
        if self.name == "hf_text":
            from codistill.data.hf_text import data_files
            check(self.path is not None, "path", "is required for data set 'hf_text': a JSONL, Parquet, Arrow or "
                  "text file, or a folder of them (or pass a datasets.Dataset to train(cfg, data=...))")
            try:
                data_files(self.path)
            except ConfigError as err:
                raise ConfigError("path", err.message) from None
        if isinstance(self.tokenizer, dict):
            folder = os.path.expanduser(str(self.tokenizer.get("path", "")))
            check(set(self.tokenizer) == {"path"}, "tokenizer", "a tokenizer folder is {path: DIR}")
            check(os.path.isfile(os.path.join(folder, "tokenizer_config.json"))
                  or os.path.isfile(os.path.join(folder, "tokenizer.json")), "tokenizer.path",
                  f"{self.tokenizer['path']!r} is not a tokenizer folder (no tokenizer.json or tokenizer_config.json)")
        root = os.path.expanduser(self.root)
        check(not os.path.isfile(root), "root", f"{self.root!r} is a file; it must be the folder where data sets "
              "are cached or found")
        check(self.batch_size >= 1, "batch_size", f"must be >= 1, got {self.batch_size}")
        check(self.eval_batch_size >= 1, "eval_batch_size", f"must be >= 1, got {self.eval_batch_size}")
        check(self.train_subset >= 0, "train_subset", f"must be >= 0, got {self.train_subset}")
        check(0 <= self.validation < 1, "validation", f"must be a fraction in [0, 1), got {self.validation}")
        check(self.max_passes >= 0, "max_passes", f"must be >= 0 (0: no limit), got {self.max_passes}")


@dataclass(frozen=True, kw_only=True, slots=True)
class ExchangeConfig:
    transport: Literal["collective", "object_store"] = "collective"
    """How peers see each other on Ray: torch.distributed all_gather, or the Ray object store.
    The local runner always exchanges in-process."""
    top_k: int = 0
    """> 0: a peer sends, per row (position), k of its soft target's tokens instead of its whole
    logits (`targets` says which). 0: whole logits."""
    top_k_dtype: Literal["fp16", "bf16", "fp32"] = "fp16"
    """The dtype top-k values travel in (the ids travel as int32)."""
    targets: Literal["top_k", "sampled"] = "top_k"
    """top_k: the k largest log-probabilities, their ids and the tail's mass (the KL over them and a tail
    bucket: biased); sampled: as many token draws from the distribution as fit those bytes (unbiased)."""
    top_k_above: int = 16384
    """With `top_k` 0, peers over more tokens than this send top-64 targets, saying so (16 × 512 positions of
    32,000 tokens: 1 GB of fp32 a step). 0: whole distributions (refused on Ray where they cannot fit)."""
    round_board_mb: float = 256.0
    """MiB of rounds the round board of peers apart may hold in its node's object store; a peer's
    rounds beyond its share go once to the run's storage, the board keeping references. 0: none."""

    def __post_init__(self):
        check(self.top_k >= 0, "top_k", f"must be >= 0 (0: send whole logits), got {self.top_k}")
        check(self.top_k_above >= 0, "top_k_above", f"must be >= 0 (0: never send top-k unasked), got {self.top_k_above}")
        check(self.round_board_mb >= 0, "round_board_mb", f"must be >= 0 (0: every round on storage), got {self.round_board_mb}")


@dataclass(frozen=True, kw_only=True, slots=True)
class RaySettings:
    address: str | None = None
    """Ray cluster to join (`ray://…`, `host:port`, or `auto`); None starts a local instance.
    `RAY_ADDRESS` in the environment is used when this is None."""
    resources_per_peer: dict[str, float] | None = None
    """Resources one peer reserves, e.g. {GPU: 1} or {CPU: 2}, split evenly over its workers.
    None: one GPU per peer when the cluster has a GPU for every peer, else one CPU."""
    workers_per_peer: int = 1
    """Data-parallel workers (DDP) per peer; peer = rank // workers_per_peer."""
    storage_path: str = "runs"
    """Where checkpoints and records go: a local directory, NFS path or s3://bucket/prefix."""
    max_failures: int = 0
    """Worker failures Ray Train recovers from (restarting from the newest checkpoint)."""
    layout: Literal["auto", "one_group"] = "auto"
    """auto: the peers of a method that exchanges in rounds (codistill) each run as their own Ray
    Train run — own workers, failures, checkpoints and restarts, meeting only through the round
    board — and every other method's peers as one group; one_group: every method's peers as the
    workers of one Ray Train run (one failure domain: a crash restarts them all)."""
    placement_strategy: Literal["SPREAD", "PACK", "STRICT_SPREAD", "STRICT_PACK"] = "SPREAD"
    """How peers are placed on nodes. SPREAD (best effort) gives each peer a node of its own
    when there are enough, so a node failure takes one peer and peers do not share a node's
    CPUs; PACK keeps them together (fastest per-step exchange over NVLink on one multi-GPU node)."""

    def __post_init__(self):
        check(self.workers_per_peer >= 1, "workers_per_peer", f"must be >= 1, got {self.workers_per_peer}")
        check(self.max_failures >= -1, "max_failures", f"must be >= -1 (-1: unlimited), got {self.max_failures}")
        for name, amount in (self.resources_per_peer or {}).items():
            check(amount >= 0, f"resources_per_peer.{name}", f"must be >= 0, got {amount}")


@dataclass(frozen=True, kw_only=True, slots=True)
class TeacherConfig:
    """A frozen teacher: a registered model and where its weights come from. It runs in every
    worker in eval mode without gradients, is in no optimizer and in no checkpoint."""

    model: str | None = None
    """Registered model of the teacher. Default: the model of `peer` in the teacher run's config."""
    model_args: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments of the teacher model's builder. Default: those of `peer` in the teacher run."""
    run: str | None = None
    """A codistill run whose newest checkpoint teaches: a run name under this run's
    `ray.storage_path`, or the run folder's path or URI (s3://…)."""
    peer: int = 0
    """Which peer of `run` teaches."""
    checkpoint: str | None = None
    """A file with the teacher's weights (a state dict, or a codistill peer checkpoint), as a
    path or URI. With `run`, codistill fills it in when the student run starts (the run's
    newest checkpoint), so a resumed student keeps the teacher it started with. Neither `run`
    nor `checkpoint`: the model brings its weights (`hf_causal_lm` with `model_args.path`)."""

    def __post_init__(self):
        from codistill.models.registry import check_model_args, loads_weights

        pretrained = self.model is not None and self.model in MODELS and loads_weights(self.model, self.model_args)
        check(self.run is not None or self.checkpoint is not None or pretrained, "run",
              "a teacher needs `run` (a codistill run), `checkpoint` (a weights file), or a model that brings its "
              "own weights (hf_causal_lm with model_args.path: a pretrained local folder)")
        check(self.run is not None or self.model is not None, "model",
              "is required with `checkpoint` (which registered model the weights belong to)")
        check(self.peer >= 0, "peer", f"must be >= 0, got {self.peer}")
        if self.model is not None:
            MODELS.get(self.model, "model")
            problem = check_model_args(self.model, self.model_args)
            check(problem is None, "model_args", problem or "")


@dataclass(frozen=True, kw_only=True, slots=True)
class ExperimentConfig:
    name: str = "run"
    """Run name: the folder under `ray.storage_path`; re-running a name resumes it."""
    imports: tuple[str, ...] = ()
    """Python modules imported before the config is read, in the driver and in every worker:
    where your own models, data sets or methods register themselves (e.g. `[mypkg.models]`)."""
    seed: int = 0
    method: MethodConfig
    """The training objective, chosen by `method.name` from the method registry."""
    peers: tuple[PeerSpec, ...] = ()
    teacher: TeacherConfig | None = None
    """A frozen teacher for the methods that learn from one (`codistill list methods`)."""
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    exchange: ExchangeConfig = field(default_factory=ExchangeConfig)
    ray: RaySettings = field(default_factory=RaySettings)
    tune: TuneSettings | None = None
    """The search space and sweep settings of `codistill tune` (ignored by `codistill train`)."""
    born_again: BornAgainSettings | None = None
    """The generations of `codistill born-again` (ignored by `codistill train`)."""
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    """The experiment trackers the run is sent to (TensorBoard, MLflow, W&B); none by default."""

    def __post_init__(self):
        check(RUN_NAME.fullmatch(self.name) is not None and self.name not in (".", ".."), "name",
              f"must be one folder name: ASCII letters, digits, . _ - + =, not starting with . or -; got {self.name!r}")
        check(0 <= self.seed < 2**53, "seed", f"must be in [0, 2**53), got {self.seed}")
        check(len(self.peers) >= 1, "peers", "needs at least one peer")
        data_kind = DATASETS[self.data.name].input_kind
        models = [(f"peers.{i}.model", peer.model) for i, peer in enumerate(self.peers)]
        if self.teacher is not None and self.teacher.model is not None:
            models.append(("teacher.model", self.teacher.model))
        for key, model in models:
            model_kind = MODELS[model].input_kind
            check(model_kind == data_kind, key,
                  f"model {model!r} takes {model_kind} input but data set {self.data.name!r} "
                  f"gives {data_kind}; models for {data_kind}: "
                  + ", ".join(sorted(n for n, m in MODELS.items() if m.input_kind == data_kind)))
        self.method.check(self.peers, self.teacher)
        self._check_batches()
        self._check_peer_sizes()
        check(self.train.on_nonfinite == "stop" or all(self.workers_of(i) == 1 for i in range(self.num_peers)),
              "train.on_nonfinite",
              "skip_step needs one worker per peer (ray.workers_per_peer and peers.<i>.workers: 1; data-parallel "
              "replicas must all take or all skip a step)")
        if self.exchange.top_k or self.exchange.targets == "sampled":
            check(self.method.takes_top_k and not self.method.also, "exchange." + ("top_k" if self.exchange.top_k else "targets"),
                  f"method {self.method.name!r}{' with also-terms' if self.method.also else ''} uses its peers' logits "
                  f"as more than soft targets; top-k targets work with: {', '.join(registered_with('takes_top_k'))}")
        if self.train.compile:
            check(not self.method.reads_taps, "train.compile",
                  f"method {self.method.name!r} reads feature taps (forward hooks), which a compiled network "
                  "does not run; set train.compile: false, or use a method without taps")
        for i, peer in enumerate(self.peers):
            check(not self.train.activation_checkpointing or MODELS[peer.model].blocks is not None,
                  "train.activation_checkpointing", f"peer {i}'s model {peer.model!r} declares no transformer blocks to "
                  f"recompute; models that do: {', '.join(sorted(n for n, m in MODELS.items() if m.blocks))}")
        if self.tune is not None:
            self._settle_objective()
        check(self.teacher is None or self.method.learns_from_teacher(), "teacher",
              f"is set, but method {self.method.name!r} learns from no teacher; remove `teacher:` or use a "
              f"method that does ({', '.join(registered_with('can_use_teacher'))}), alone or in `method.also`")

    def _settle_objective(self) -> None:
        """A sweep's objective follows the data's task when not given: the ensemble's accuracy,
        or a language model's ensemble bits per token. Bits are refused on data scored by accuracy
        (it reports none); accuracy, asked, stays allowed on a language model (it reports both)."""
        score = DATASETS[self.data.name].task.score
        if self.tune.objective is None:
            object.__setattr__(self, "tune", replace(self.tune, objective=f"ensemble_{score.name}"))
        check(self.tune.score is not BITS or score is BITS, "tune.objective",
              f"{self.tune.objective!r} is bits per token, which data set {self.data.name!r} (scored by {score.label}) "
              "does not report; use best_accuracy, mean_accuracy, ensemble_accuracy or member_mean_accuracy")

    @property
    def layout(self) -> str:
        """`ray.layout` resolved: `apart` (each peer its own Ray Train run) for a method that
        exchanges in rounds under `auto`, else `one_group`; the Ray runner's layout of that name
        (`engine/ray/layouts.py`) is what acts on it."""
        return "apart" if self.method.exchanges_in_rounds and self.ray.layout == "auto" else "one_group"

    def workers_of(self, peer: int) -> int:
        """Peer `peer`'s data-parallel workers on the Ray runner."""
        return self.peers[peer].workers or self.ray.workers_per_peer

    def _check_peer_sizes(self) -> None:
        """Per-peer sizes need a Ray Train run per peer: one Ray Train group has one size for all."""
        for i, peer in enumerate(self.peers):
            for key, value in (("workers", peer.workers), ("resources", peer.resources)):
                if value is None or self.layout == "apart":
                    continue
                why = ("ray.layout: one_group runs its peers as one group" if self.method.exchanges_in_rounds else
                       f"method {self.method.name!r} exchanges every step, so its peers run as one group")
                raise ConfigError(f"peers.{i}.{key}", (
                    f"sizes one peer, which only peers with a Ray Train run each can have (methods that exchange in rounds: "
                    f"{', '.join(registered_with('exchanges_in_rounds'))}, with ray.layout: auto); {why}: set "
                    f"ray.{'workers_per_peer' if key == 'workers' else 'resources_per_peer'} for every peer instead"))

    def _check_batches(self) -> None:
        """Every peer needs one whole batch of its examples (the last incomplete batch of an
        epoch is dropped): checked here, before any run starts, where the data set's size is known."""
        total = self.data.train_examples or DATASETS[self.data.name].train_examples
        if total is None:
            return
        examples = min(self.data.train_subset or total, total)
        examples -= round(self.data.validation * examples)
        per_peer = examples // self.num_peers if self.data.shard else examples
        if self.data.batch_size > per_peer:
            where = f"the {per_peer} examples each peer's shard holds" if self.data.shard else f"the {per_peer} training examples"
            fix = "lower data.batch_size" + (" or raise data.train_subset" if self.data.train_subset else "")
            raise ConfigError("data.batch_size", f"{self.data.batch_size} is more than {where} of "
                                                 f"{self.data.name!r}; {fix}")

    @property
    def num_peers(self) -> int:
        return len(self.peers)
