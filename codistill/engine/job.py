"""One peer's job, built in one place for every runner and benchmark: `make_job`.

A job holds the peer's network and optimizer, the method, its data and batch schedule, the
exchange, where its evaluations go (the layout's evaluation sink), and the
signal sources its method declared it needs (peers every step, stale peers per round, a frozen
teacher). It is complete when built."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
from torch import nn

from codistill.config import ExperimentConfig, OptimizerConfig, PeerSpec, TrainConfig
from codistill.data import ArrayDataset, BatchSchedule
from codistill.data.task import Task
from codistill.errors import ConfigError, first_line
from codistill.engine.evaluate import EvaluationSink, Gathered
from codistill.engine.mesh import MeshPlace, PeerMesh
from codistill.engine.precision import COMPUTE_DTYPES, Precision
from codistill.engine.sharding import blocks_of, checkpoint_activations, fully_sharded
from codistill.engine.sources import FrozenTeacher, PeerPayloads, SignalSource
from codistill.engine.seeds import init_seed
from codistill.engine.stages import load_stages
from codistill.engine.stale_peers import stale_peers_source
from codistill.engine.teacher import load_teacher
from codistill.exchange import Exchange, PeriodicExchange
from codistill.methods import Method, create_method
from codistill.models import MODELS, create_model
from codistill.models.registry import check_model_tokenizer
from codistill.models.taps import tap_shapes

logger = logging.getLogger(__name__)


@dataclass
class Peer:
    index: int
    spec: PeerSpec
    base: nn.Module
    """The registered model inside `network` (where the feature taps are)."""
    network: nn.Module
    """What trains: the model as the method shaped it (branches, a gate, a regressor, …)."""
    optimizer: torch.optim.Optimizer


@dataclass(frozen=True)
class PeerJob:
    """Everything one worker trains with. `place`: this worker's place in the mesh of peers ×
    replicas (a replica trains on its slice of the shared batch)."""

    peer: Peer
    method: Method
    data: ArrayDataset
    schedule: BatchSchedule
    train: TrainConfig
    device: torch.device
    exchange: Exchange | None
    """The every-step all-gather (methods that need peers, and evaluations in one group); None
    for peers apart, which post their evaluations instead."""
    sources: tuple[SignalSource, ...]
    tap_paths: dict[str, str]
    seed: int = 0
    train_model: nn.Module | None = None
    """What the forward pass runs: the network, or its DDP wrapper when replicas > 1 (a peer
    sharded with FSDP: the network itself, sharded in place)."""
    place: MeshPlace | None = None
    precision: Precision | None = None
    """`train.precision`: the forward pass's compute dtype, backward and the optimizer step."""
    evaluations: EvaluationSink | None = None
    """Where this peer's evaluations go (`evaluate.Gathered` through `exchange` by default)."""
    channels_last: bool = False
    sync_timing: bool = False
    """Wait for the device at each part of a step, so a step's parts are their own (benchmarks)."""

    @property
    def is_leader(self) -> bool:
        return self.place.is_leader

    @property
    def replicas(self) -> int:
        return self.place.replicas

    @property
    def sharded(self) -> bool:
        """Whether the peer is split over its replicas (FSDP): then every replica takes part in
        gathering its state for a checkpoint, which its leader writes."""
        return self.precision is not None and self.precision.sharded


def make_optimizer(cfg: OptimizerConfig, params) -> torch.optim.Optimizer:
    if cfg.name == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                               nesterov=cfg.nesterov and cfg.momentum > 0)
    if cfg.name == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def learning_rate(cfg: OptimizerConfig, step: int, total_steps: int) -> float:
    """A pure function of the step, so a resumed run needs no scheduler state."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "cosine":
        progress = (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps)
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * progress))
    if cfg.schedule == "multistep":
        return cfg.lr * 0.1 ** sum(step >= m * total_steps for m in cfg.milestones)
    return cfg.lr


def peer_schedules(cfg: ExperimentConfig, num_examples: int) -> list[BatchSchedule]:
    """Each peer's batch schedule: its own shard of the data when `data.shard`, else one
    schedule all peers share."""
    if not cfg.data.shard:
        schedules = [BatchSchedule(num_examples, cfg.data.batch_size, cfg.seed)]
    else:
        schedules = [BatchSchedule(num_examples, cfg.data.batch_size, cfg.seed, shard=k, num_shards=cfg.num_peers)
                     for k in range(cfg.num_peers)]
    _check_passes(cfg, len(schedules[0].pool))
    return schedules


def _check_passes(cfg: ExperimentConfig, pool: int) -> None:
    """`data.max_passes`: refused here, where the number of training examples (text windows, after
    a validation hold-out) is known — a corpus's size is only known once it is tokenized."""
    drawn = cfg.train.steps * cfg.data.batch_size
    if cfg.data.max_passes and drawn > cfg.data.max_passes * pool:
        raise ConfigError("data.max_passes", (
            f"is {cfg.data.max_passes:g}, but {cfg.train.steps} steps of batch {cfg.data.batch_size} draw {drawn:,} "
            f"examples from the {pool:,} each peer trains on ({drawn / pool:.2f} passes); lower data.batch_size, or "
            f"train.steps to at most {int(cfg.data.max_passes * pool) // cfg.data.batch_size} at this batch"))


def tap_paths_of(model: str, taps) -> dict[str, str]:
    """Where each of `taps` sits in registered model `model` (tap name → module path)."""
    return {tap: MODELS[model].taps[tap] for tap in taps}


def _tap_shapes_of(spec: PeerSpec, taps, num_classes: int, example: torch.Tensor) -> dict:
    """The shapes of one example's `taps` in a model built as `spec` says (random weights, and
    random numbers that are put back: building it changes nothing of the run)."""
    with torch.random.fork_rng(devices=[]):
        model = create_model(spec.model, num_classes, **spec.model_args)
    return tap_shapes(model, tap_paths_of(spec.model, taps), example)


def build_peer(index: int, spec: PeerSpec, data: ArrayDataset, seed: int, device: torch.device, method: Method,
               teacher: FrozenTeacher | None = None, batch_size: int = 0,
               other_peers: tuple[PeerSpec, ...] = ()) -> Peer:
    """Peer `index`'s network (the registered model, shaped by the method) and optimizer. The
    init seed depends on (seed, index) only, so a peer starts from the same weights in every
    runner; different peers start differently, which is what makes mutual learning worth anything.
    `other_peers`: the other peers' specs, in peer order (a method that reads their taps every
    step sizes its modules from them: a contrastive head per other peer)."""
    paths = tap_paths_of(spec.model, method.needs.taps)
    example = next(data.test_batches(2))[0]
    needs = method.needs
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(init_seed(seed, index))
        check_model_tokenizer(spec.model, spec.model_args, data.tokenizer, f"peers.{index}.model_args")
        try:
            base = create_model(spec.model, data.num_classes, **spec.model_args)
        except ConfigError as err:  # a model's refusal of its args (a vocabulary too small) names the peer
            raise (err.under(f"peers.{index}") if err.path.startswith("model_args") else err) from None
        shapes = {"own": tap_shapes(base, paths, example),
                  "teacher": teacher.tap_shapes(example) if teacher is not None else {},
                  "peers": [_tap_shapes_of(other, needs.taps, data.num_classes, example) for other in other_peers]
                  if needs.peers and needs.taps else [],
                  "train_labels": data.y_train}
        network = method.build_network(base, spec.model, shapes).to(device)
    check_output(network, method, spec.model, index, example.to(device), data.num_classes, data.rows(example))
    if batch_size:
        check_training_output(network, method, spec.model, index, data, batch_size, device)
    # Only what trains: a method's frozen parts (a temporal mean) are in the network and its
    # checkpoints, never in the optimizer.
    trainable = [p for p in network.parameters() if p.requires_grad]
    return Peer(index, spec, base, network, make_optimizer(spec.optimizer, trainable))


@torch.no_grad()
def check_output(network: nn.Module, method: Method, model: str, index: int, example: torch.Tensor,
                 num_classes: int, rows: int) -> None:
    """A classifier must give [rows, num_classes] logits (rows: the batch, or batch × positions
    for tokens): said at start-up, naming the peer's model, instead of a shape error deep inside a loss."""
    was_training = network.training
    network.eval()
    try:
        logits = method.logits(network(example))
    except Exception as err:  # noqa: BLE001 — the model cannot even take the data's input
        raise ConfigError(f"peers.{index}.model", f"model {model!r} fails on a batch of the data "
                          f"{list(example.shape)}: {first_line(err, 200)}") from None
    finally:
        network.train(was_training)
    if not isinstance(logits, torch.Tensor) or tuple(logits.shape) != (rows, num_classes):
        got = list(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ConfigError(f"peers.{index}.model", f"model {model!r} returns {got} for a batch of "
                          f"{example.shape[0]}; a peer must return logits [rows, num_classes] = "
                          f"[{rows}, {num_classes}]")


@torch.no_grad()
def check_training_output(network: nn.Module, method: Method, model: str, index: int, data: ArrayDataset,
                          batch_size: int, device: torch.device) -> None:
    """`check_output` once more as training calls the model: in training mode, on a batch of the
    real size (a model may return an auxiliary output only when training, or hard-wire a batch
    size). Nothing of the probe stays: the weights and buffers (a normalisation's running
    statistics) are put back and the random numbers (dropout) are not consumed."""
    x, _ = data.train_batch(torch.arange(batch_size) % len(data.y_train), torch.Generator().manual_seed(0))
    before = {k: v.clone() for k, v in network.state_dict().items()}
    rows = data.rows(x)
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            try:
                logits = method.logits(network(x.to(device)))
            except Exception as err:  # noqa: BLE001 — said at start-up, not deep inside a loss
                raise ConfigError(f"peers.{index}.model", f"model {model!r} fails in training mode on a batch of "
                                  f"{batch_size} {list(x.shape)}: {first_line(err, 200)}") from None
    finally:
        network.load_state_dict(before)
    if not isinstance(logits, torch.Tensor) or tuple(logits.shape) != (rows, data.num_classes):
        got = list(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ConfigError(f"peers.{index}.model", f"model {model!r} returns {got} in training mode for a batch of "
                          f"{batch_size}; a peer must return logits [rows, num_classes] = [{rows}, {data.num_classes}]")


def vocabulary_decides_top_k(cfg: ExperimentConfig) -> bool:
    """Whether the vocabulary decides what peers send: `exchange.top_k` unset, and a method whose
    peers exchange soft targets (not a teacher's targets, which travel nowhere)."""
    method = cfg.method
    return not cfg.exchange.top_k and method.takes_top_k and not method.also and not method.uses_teacher


def exchanged_top_k(cfg: ExperimentConfig, task: Task) -> int:
    """The k of the top-k targets peers send (0: whole logits): `exchange.top_k`, or the task's
    default when the vocabulary decides (`NextToken`: AUTO_TOP_K above `exchange.top_k_above`).
    A `top_k` not below the task's outputs keeps them all: that is the whole distribution, which
    whole logits send in fewer bytes."""
    if not vocabulary_decides_top_k(cfg):
        return cfg.exchange.top_k if cfg.exchange.top_k < task.size else 0
    return task.default_top_k(cfg.exchange.top_k_above)


def top_k_note(cfg: ExperimentConfig, vocab: int, k: int) -> str:
    """What the run's output says when what peers send is not `exchange.top_k`."""
    if not k and not cfg.exchange.top_k:
        return (f"exchange.targets=sampled, but with exchange.top_k 0 peers send whole logits over these {vocab} "
                "classes (set exchange.top_k: the draws take top-k's bytes)")
    if cfg.exchange.top_k and not k:
        return (f"exchange.top_k={cfg.exchange.top_k} is not below the {vocab} classes (the vocabulary): peers send "
                "whole logits, the same distribution in fewer bytes")
    sent = f"top-{k} targets" if cfg.exchange.targets == "top_k" else f"sampled targets in the bytes of top-{k}"
    return (f"the vocabulary has {vocab} tokens, more than exchange.top_k_above={cfg.exchange.top_k_above}: peers "
            f"send {sent} (set exchange.top_k for another k, or exchange.top_k_above=0 for whole "
            "distributions)")


def make_job(cfg: ExperimentConfig, peer_index: int, data: ArrayDataset, schedules: list[BatchSchedule],
             device: torch.device, exchange: Exchange | None, periodic: PeriodicExchange | None = None,
             place: MeshPlace | None = None, evaluations: EvaluationSink | None = None) -> PeerJob:
    """The job of peer `peer_index` at `place` in the mesh (default: the only replica of a mesh
    without a device mesh, as the local runner's threads are). `periodic` serves a method that
    exchanges in rounds; `evaluations` (the layout's) where evaluations go, by default the
    all-gather through `exchange` (which a peer that posts them elsewhere may lack)."""
    place = place or PeerMesh(cfg.num_peers).place(peer_index)
    k = exchanged_top_k(cfg, data.task)
    if (k != cfg.exchange.top_k or not k and cfg.exchange.targets == "sampled") and peer_index == 0 and place.is_leader:
        logger.warning(top_k_note(cfg, data.num_classes, k))
    top_k = (k, COMPUTE_DTYPES[cfg.exchange.top_k_dtype] or torch.float32) if k else None
    method = create_method(cfg.method, top_k=top_k, targets=cfg.exchange.targets)
    needs = method.needs
    teacher = None
    if needs.teacher:
        network = load_teacher(cfg.teacher, data.num_classes, device, data.tokenizer)
        entry = MODELS[cfg.teacher.model]
        teacher = FrozenTeacher(network, tap_paths_of(cfg.teacher.model, needs.teacher_taps),
                                {tap: entry.norms[tap] for tap in needs.teacher_norms if tap in entry.norms},
                                load_stages(cfg, needs.teacher_stages, device))
    if cfg.train.data_on_device:
        data = data.to(device)  # once; every batch is then cut and augmented where it trains
    peer = build_peer(peer_index, cfg.peers[peer_index], data, cfg.seed, device, method, teacher,
                      batch_size=cfg.data.batch_size // place.replicas,
                      other_peers=tuple(p for k, p in enumerate(cfg.peers) if k != peer_index))
    # channels_last: the layout tensor cores want for convolutions; on a CPU it only costs.
    channels_last = device.type == "cuda" and data.input_kind == "image"
    if channels_last:
        peer.network.to(memory_format=torch.channels_last)
    sources: list[SignalSource] = []
    if teacher is not None:
        sources.append(teacher)
    if needs.peers:
        sources.append(PeerPayloads())
    if needs.rounds is not None:
        sources.append(stale_peers_source(periodic, needs.rounds, cfg.peers, schedules))
    precision = Precision(cfg.train.precision, device, sharded=cfg.train.sharding == "fsdp" and place.replicas > 1)
    train_model = _split(cfg, peer, teacher, place, precision, device)
    if cfg.train.compile:
        train_model = torch.compile(train_model)  # evaluation runs the plain network
    return PeerJob(peer=peer, method=method, data=data, schedule=schedules[peer_index if cfg.data.shard else 0],
                   train=cfg.train, device=device, exchange=exchange, sources=tuple(sources),
                   tap_paths=tap_paths_of(peer.spec.model, needs.taps), seed=cfg.seed,
                   train_model=train_model, place=place,
                   precision=precision,
                   channels_last=channels_last,
                   evaluations=evaluations or Gathered())


def _split(cfg: ExperimentConfig, peer: Peer, teacher: FrozenTeacher | None, place: MeshPlace, precision: Precision,
           device: torch.device) -> nn.Module:
    """What the forward pass of training runs, with the peer split over its replicas as
    `train.sharding` says: DDP's wrapper, or the network sharded in place by FSDP — and then the
    teacher too, which would otherwise sit whole beside the students' shards (huggingface/trl#2580)."""
    blocks = blocks_of(peer.spec.model, peer.base)
    if cfg.train.activation_checkpointing:
        checkpoint_activations(blocks)
    if not precision.sharded:
        return place.replicated(peer.network, device)
    policy = precision.sharding_policy()
    fully_sharded(peer.network, blocks, place.replica_mesh, policy)
    # FSDP2 replaced the parameters with their shards: the optimizer is built over those.
    peer.optimizer = make_optimizer(peer.spec.optimizer, [p for p in peer.network.parameters() if p.requires_grad])
    if teacher is not None:
        fully_sharded(teacher.network, blocks_of(cfg.teacher.model, teacher.network), place.replica_mesh, policy,
                      frozen=True)
    return peer.network
