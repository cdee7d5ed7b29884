"""One typed, validated run configuration shared by the ServerApp and the ClientApp.

Every key of ``[tool.flwr.app.config]`` in ``pyproject.toml`` is a field of
:class:`RunConfig` (kebab-case there, snake_case here); ``tests/test_config.py`` keeps the
two in step. :func:`parse_run_config` turns Flower's ``context.run_config`` into a
``RunConfig`` and rejects bad values with a :class:`ConfigError` that names the key.

A ``RunConfig`` is a value: it builds nothing (:mod:`kta_flwr.factory` turns it into
components) and importing it loads neither torch nor flwr. The name tables of the
strategies, datasets and models live here; the registries that implement them
(:data:`kta_flwr.task.datasets.DATASETS`, :data:`kta_flwr.task.models.MODELS`) check at
import that they match (:func:`check_registry`). Every key is described once, in
``docs/configuration.md``.
"""

from __future__ import annotations

import dataclasses
import math
import random
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from kta_flwr.maths.knowledge_codec import CODECS
from kta_flwr.maths.market_kernels import DIVERGENCES

# --- strategies, by family ---------------------------------------------------------------
#: Family: clients keep their own models and exchange reference-set predictions (or nothing).
MARKET = "market"
#: Family: Flower's stock parameter-averaging strategies (dense weights both ways).
PARAMETERS = "parameters"
#: Family: parameter baselines that send compressed updates of a shared model.
COMPRESSED = "compressed"
#: Family: parameter-sharing personalization: Flower's FedAvg on the shared weights, and a
#: personal model (or head) that each node keeps (fedavg-ft, Ditto, FedRep).
PERSONAL = "personal"
#: Family: one global model whose width-scaled sub-models the clients train (HeteroFL).
SUBMODELS = "submodels"
#: Family: clients keep their own models and exchange class prototypes (FedProto).
PROTOTYPES = "prototypes"
#: Family: FedAvg among the clients of the fleet's most common architecture; the others
#: train alone (the "largest common sub-model" a practitioner would try first).
COMMON = "common"

#: Strategy name -> family.
STRATEGY_FAMILIES: dict[str, str] = {
    "kta": MARKET, "fedmd": MARKET, "ktpfl": MARKET, "local": MARKET,
    "fedavg": PARAMETERS, "fedprox": PARAMETERS,
    "fedmedian": PARAMETERS, "krum": PARAMETERS, "fedtrimmedavg": PARAMETERS,
    "fedavg-topk": COMPRESSED, "sapef": COMPRESSED, "fedkd": COMPRESSED,
    "fedavg-ft": PERSONAL, "ditto": PERSONAL, "fedrep": PERSONAL,
    "heterofl": SUBMODELS, "fedproto": PROTOTYPES, "fedavg-common": COMMON,
}
STRATEGIES = tuple(STRATEGY_FAMILIES)
MARKET_STRATEGIES = tuple(n for n, f in STRATEGY_FAMILIES.items() if f == MARKET)
#: The market strategies that upload predictions and distil the targets they get back
#: (all but ``local``).
KNOWLEDGE_STRATEGIES = tuple(n for n in MARKET_STRATEGIES if n != "local")
#: What the server's global model (``server-model``) learns toward: the market's consensus
#: of the uploads, or the public rows' labels alone (the baseline without any client).
SERVER_MODEL_TEACHERS = ("consensus", "labels")
#: Where a market newcomer starts: its own initialisation, or the server's global model.
NEWCOMER_STARTS = ("scratch", "global")
#: Where an unlabeled transfer set comes from (``transfer-source``; "": none): rows of
#: the training pool no client holds (labels dropped), another dataset's training inputs
#: (``emnist``: EMNIST Letters), or a user's array file of model inputs.
TRANSFER_SOURCES = ("", "pool", "emnist", "femnist", "file")
PARAMETER_STRATEGIES = tuple(n for n, f in STRATEGY_FAMILIES.items() if f == PARAMETERS)
COMPRESSED_STRATEGIES = tuple(n for n, f in STRATEGY_FAMILIES.items() if f == COMPRESSED)
PERSONAL_STRATEGIES = tuple(n for n, f in STRATEGY_FAMILIES.items() if f == PERSONAL)
#: Compressed strategy -> the compressor of its updates (:mod:`kta_flwr.maths.update_compression`).
UPDATE_COMPRESSORS: dict[str, str] = {"fedavg-topk": "topk", "sapef": "topk", "fedkd": "svd"}
#: Strategies whose clients keep a private model next to the shared one (FedKD's teacher).
PRIVATE_TEACHER_STRATEGIES = ("fedkd",)

# --- data and models ---------------------------------------------------------------------
#: Dataset names (loaders: :data:`kta_flwr.task.datasets.DATASETS`).
DATASETS = ("digits", "cifar10", "femnist", "agnews", "emnist")
#: Datasets whose inputs are text (they need a text model such as ``textbag``).
TEXT_DATASETS = frozenset({"agnews"})
#: Image datasets whose labels survive a horizontal flip (photographs; not characters).
MIRRORABLE_DATASETS = frozenset({"cifar10"})
#: Model names (builders: :data:`kta_flwr.task.models.MODELS`).
MODELS = ("mlp", "cnn", "simplecnn", "simplecnn_small", "resnet8", "resnet18", "femnist_cnn", "textbag",
          "minilm")
#: Models that read token ids instead of images.
TEXT_MODELS = frozenset({"textbag", "minilm"})
#: Models whose hidden layers scale with a width rate (HeteroFL's sub-models,
#: :func:`kta_flwr.task.models.build_model`).
WIDTH_SCALABLE_MODELS = frozenset({"mlp", "cnn", "simplecnn", "simplecnn_small", "resnet8", "femnist_cnn"})

#: Fleet profiles: name -> dataset -> the tiers ``(tier, model)``, smallest device first.
#: A profile gives every partition the model of its tier (:meth:`RunConfig.tier_of_partition`).
FLEETS: dict[str, dict[str, tuple[tuple[str, str], ...]]] = {
    "tiers3": {
        "cifar10": (("small", "simplecnn_small"), ("medium", "simplecnn"), ("large", "resnet8")),
        # the small tier is the tiny CNN, not the MLP: on FEMNIST's light pages the MLP does
        # not learn at the preset's learning rate (0.06-0.09 on a client's test rows)
        "femnist": (("small", "cnn"), ("medium", "femnist_cnn"), ("large", "resnet8")),
        "emnist": (("small", "cnn"), ("medium", "femnist_cnn"), ("large", "resnet8")),
        "digits": (("small", "cnn"), ("medium", "mlp"), ("large", "resnet8")),
    },
}

#: How the training pool is split into clients: flwr-datasets' partitioners, and the
#: writer split (:func:`kta_flwr.task.splits.partition_indices`).
PARTITIONERS = ("dirichlet", "iid", "natural", "shard", "pathological", "linear", "exponential")
TARGET_SPACES = ("prob", "logit")
#: What a kta teacher's weight is scaled by (:mod:`kta_flwr.maths.market`, step 5).
TEACHER_QUALITIES = ("information", "likelihood", "accuracy")
#: ``reference-labels``: the server scores teachers on the public labels, or on the others'
#: consensus without any (docs/method.md#the-unlabeled-mode)
REFERENCE_LABELS_PUBLIC, REFERENCE_LABELS_NONE = "public", "none"
REFERENCE_LABELS = (REFERENCE_LABELS_PUBLIC, REFERENCE_LABELS_NONE)
MARKETS = ("adaptive", "fixed")
DEVICES = ("auto", "cpu", "cuda")
#: Where the server runs the market's heavy steps: numpy on the CPU, or torch on a GPU.
MARKET_DEVICES = ("cpu", "auto", "cuda")
#: Where a node keeps its models between messages: in its Context (and on disk), or on
#: disk only (a simulation of many stateful clients holds no model in memory).
NODE_STATE_MEMORY, NODE_STATE_DISK = "memory", "disk"
NODE_STATES = (NODE_STATE_MEMORY, NODE_STATE_DISK)

#: ``tracking``: MLflow when it is installed (the ``tracking`` extra), else nothing; MLflow
#: (refused at start without it); nothing.
TRACKING_AUTO, TRACKING_MLFLOW, TRACKING_NONE = "auto", "mlflow", "none"
#: A switch's third value: on unless the rest of the config rules it out (:data:`SWITCHES`).
AUTO = "auto"
#: Keys that take ``true``, ``false`` or ``"auto"`` (each resolved by a
#: :class:`RunConfig` property: ``distill-label-mix`` by ``label_mix``).
SWITCHES = ("distill-label-mix",)
TRACKINGS = (TRACKING_AUTO, TRACKING_MLFLOW, TRACKING_NONE)
#: The keys that say where a run is reported, not what it computes.
TRACKING_KEYS = ("tracking", "tracking-uri", "tracking-experiment")
#: How the compressed baselines combine a round's decoded updates (mean: FedAvg's).
UPDATE_AGGREGATIONS = ("mean", "median", "trimmed-mean")
#: Attacks that replace the logits a market client uploads (:mod:`kta_flwr.client.attacks`).
LOGIT_ATTACKS = ("gaming", "rolled", "sign-flip", "cpa", "celmax", "scaled", "confident-wrong",
                 "random", "sybil", "budgeted", "copy-targets")
#: Attack name -> the strategy families it applies to.
ATTACK_FAMILIES: dict[str, frozenset[str]] = {
    "none": frozenset({MARKET, PARAMETERS, COMPRESSED, PERSONAL, SUBMODELS, PROTOTYPES, COMMON}),
    **dict.fromkeys((*LOGIT_ATTACKS, "malformed"), frozenset({MARKET})),
    "label-flip": frozenset({MARKET, PARAMETERS, COMPRESSED, PERSONAL, SUBMODELS, PROTOTYPES, COMMON}),
    **dict.fromkeys(("negated", "scaled-update"), frozenset({PARAMETERS, PERSONAL, COMPRESSED})),
}
ATTACKS = tuple(ATTACK_FAMILIES)


#: Where relative ``data-path`` values point (e.g. a symlink to ``../shared/datasets``).
DATA_ROOT = Path("~/kta-flwr/data")


def is_hub_path(data_path: str) -> bool:
    """True for ``"hub"`` and ``"hub:<owner>/<name>"`` (load the public hub copy)."""
    return data_path == "hub" or data_path.startswith("hub:")


class ConfigError(ValueError):
    """A run-config value is invalid; the message names the key and what is allowed."""


def check_registry(kind: str, registry: Iterable[str], names: Iterable[str]) -> None:
    """Fail at import when a registry's keys differ from the config's name table.

    Raises:
        RuntimeError: naming the names only one side has.
    """
    have, want = set(registry), set(names)
    if have != want:
        raise RuntimeError(
            f"the {kind} registry and kta_flwr.config disagree: only in the registry "
            f"{sorted(have - want)}, only in the config {sorted(want - have)}"
        )


@dataclass(frozen=True)
class RunConfig:  # pylint: disable=too-many-instance-attributes
    """All run-config keys with their defaults (mirrors ``[tool.flwr.app.config]``)."""

    # --- federation -------------------------------------------------------------
    strategy: str = "kta"
    num_server_rounds: int = 10
    fraction_train: float = 1.0
    fraction_evaluate: float = 1.0
    min_nodes: int = 2
    round_timeout: float = 600.0
    evaluate_every: int = 1
    seed: int = 0
    node_wait_timeout: float = 300.0
    min_round_nodes: int = 1
    max_staleness: int = 3
    # --- data -------------------------------------------------------------------
    dataset: str = "digits"
    data_path: str = ""
    partitioner: str = "dirichlet"
    dirichlet_alpha: float = 0.5
    shards_per_partition: int = 2  # partitioner 'shard': label-sorted shards per client
    classes_per_partition: int = 2  # partitioner 'pathological': classes per client
    reference_size: int = 300
    test_size: int = 300
    max_train_size: int = 0
    vocab_size: int = 20000
    text_length: int = 64
    finetune_layers: int = 1
    # --- models and local training ----------------------------------------------
    models: str = "mlp"
    fleet: str = ""  # a profile of FLEETS: each partition's model by its tier (replaces models)
    local_epochs: int = 2
    distill_epochs: int = 4
    batch_size: int = 32
    learning_rate: float = 0.05
    distill_learning_rate: float = 0.05
    lr_decay: float = 1.0  # every client learning rate in round r: lr x lr_decay ** (r - 1)
    momentum: float = 0.9
    weight_decay: float = 5e-4
    proximal_mu: float = 0.01
    bn_recalibrate: bool = True  # BatchNorm's running statistics recomputed after training
    # --- parameter-sharing personalization (fedavg-ft, ditto, fedrep) --------------
    finetune_epochs: int = 1
    ditto_lambda: float = 0.1
    head_epochs: int = 10
    # --- knowledge market -------------------------------------------------------
    market: str = "adaptive"
    temperature: float = 3.0
    distill_weight: float = 1.0
    reference_ce_weight: float = 0.0
    private_ce_weight: float = 1.0
    distill_label_mix: bool | str = AUTO  # stage 2's rows weighted by the client's own label mix
    divergence: str = "js"
    similarity_tau: float = 0.02
    neighbours: int = 0
    divergence_rows: int = 0
    background_teacher: bool = False
    market_device: str = "cpu"
    self_weight: float = 0.0
    accuracy_exponent: float = 1.0
    target_space: str = "logit"
    codec: str = "float32"
    codec_topk: int = 3
    reference_fraction: float = 1.0
    holdout_fraction: float = 0.2
    prior_correction: bool = True
    distill_gate: bool = True
    distill_clip: float = 5.0
    # --- defences of the market (kta; docs/robustness.md) ------------------------------
    consistency_check: bool = True
    teacher_quality: str = "information"
    sybil_divergence: float = 1e-5
    loudness_cap: float = 2.0
    score_uniform_share: float = 0.0
    class_quality: bool = False
    label_share: float = 0.1
    reference_labels: str = REFERENCE_LABELS_PUBLIC  # "none": the server holds no reference label (REFERENCE_LABELS)
    # --- an unlabeled transfer set beside the labeled reference set (docs/method.md#the-transfer-set)
    transfer_source: str = ""  # "", "pool", "emnist", "femnist" or "file" (TRANSFER_SOURCES)
    transfer_path: str = ""  # emnist / femnist / file: where the inputs are (relative: as data-path)
    transfer_size: int = 2000  # rows in the transfer set
    transfer_rows: int = 200  # transfer rows exchanged per round (a rotating window)
    distill_augment: bool = False  # images: stage 2's inputs shifted (and flipped where labels survive it)
    # --- the server's global model under the market (docs/method.md#the-servers-global-model)
    server_model: str = ""  # a model name: distilled on the server from the consensus; "": none
    server_model_epochs: int = 5
    server_model_label_weight: float = 1.0
    server_model_teacher: str = "consensus"  # or "labels": the public labels alone (a baseline)
    server_model_augment: bool = True  # images: random shifts (and flips where labels survive them)
    server_model_teacher_weight: float = 0.0  # its predictions' share in every client's targets
    server_model_learning_rate: float = 0.0  # its SGD learning rate; 0: distill-learning-rate
    # --- newcomers: partitions that join a running fleet (docs/method.md#newcomers) --------
    newcomer_fraction: float = 0.0  # share of the fleet's partitions held back (0: none)
    newcomer_round: int = 0  # the round they join
    newcomer_start: str = "scratch"  # market: "scratch" or "global" (the server model's weights)
    # --- robust parameter aggregators (Flower's Krum, FedTrimmedAvg) ---------------------
    krum_malicious: int = 2
    trim_beta: float = 0.2
    # --- compressed-update baselines ---------------------------------------------
    topk_fraction: float = 0.01
    update_aggregation: str = "mean"
    sapef_alpha: float = 0.5
    svd_energy: float = 0.95
    svd_energy_end: float = 0.98
    student_model: str = ""
    # --- peers for mixed fleets (HeteroFL, FedProto) ------------------------------------
    heterofl_rates: str = "0.25,0.5,1"  # width rate per tier of 'fleet', smallest first
    prototype_dim: int = 64
    prototype_weight: float = 1.0
    # --- runtime ----------------------------------------------------------------
    device: str = "auto"
    output_dir: str = "~/kta-flwr/outputs"
    # --- experiment tracking (docs/running.md#experiment-tracking) -----------------------
    tracking: str = TRACKING_AUTO
    tracking_uri: str = ""  # empty: sqlite:///<output-dir>/mlflow.db, artifacts beside it
    tracking_experiment: str = "kta-flwr"
    # --- what training produces -------------------------------------------------------
    model_dir: str = "~/kta-flwr/models"
    warm_start: bool = False
    node_state: str = NODE_STATE_MEMORY
    resume_from: str = ""
    # --- differential privacy (docs/privacy.md; 0 = off) ------------------------------------
    dp_epsilon: float = 0.0
    dp_noise: float = 0.0
    dp_delta: float = 0.0
    dp_clip: float = 1.0
    dp_lifetime_epsilon: float = 0.0
    logit_noise: float = 0.0
    logit_clip: float = 5.0
    # --- fault injection (tests and fault benchmarks; 0 = off) ---------------------------
    fault_dropout: float = 0.0
    fault_straggler: float = 0.0
    # --- attacks (research; off by default; docs/robustness.md) -----------------------------
    attack: str = "none"
    attack_fraction: float = 0.0
    attack_scale: float = 10.0
    attack_budget: float = 0.2
    attack_noise: float = 0.0

    # ---------------------------------------------------------------------------
    @property
    def model_names(self) -> tuple[str, ...]:
        """Architectures: the fleet's tiers' (``fleet``), else those of ``models``, assigned
        round-robin to partitions (``models = "mlp,cnn"``)."""
        if self.fleet:
            return tuple(model for _, model in self.fleet_tiers)
        return tuple(name.strip() for name in self.models.split(",") if name.strip())

    @property
    def server_model_lr(self) -> float:
        """The server model's SGD learning rate: ``server-model-learning-rate``, or
        ``distill-learning-rate`` where that is 0."""
        return self.server_model_learning_rate or self.distill_learning_rate

    @property
    def fleet_tiers(self) -> tuple[tuple[str, str], ...]:
        """``(tier, model)`` of each tier of ``fleet`` for ``dataset``, smallest first
        (empty without a fleet)."""
        return FLEETS[self.fleet][self.dataset] if self.fleet else ()

    def tier_of_partition(self, partition_id: int) -> int:
        """Index into :attr:`fleet_tiers` of partition ``partition_id``'s tier: each block
        of consecutive partitions (as many as tiers) holds every tier once, in an order
        drawn from ``seed`` and the block, so any fleet of a multiple of that size is
        split evenly and a partition's tier does not depend on the fleet's size; 0
        without a fleet."""
        tiers = len(self.fleet_tiers)
        if tiers == 0:
            return 0
        block, slot = divmod(partition_id, tiers)
        order = random.Random(f"kta-flwr fleet {self.fleet} {self.seed} {block}").sample(range(tiers), tiers)
        return order[slot]

    def model_for_partition(self, partition_id: int) -> str:
        """Name of the architecture that partition ``partition_id`` trains (HeteroFL: the
        one global architecture, at the width of :meth:`width_of_partition`)."""
        if self.family == SUBMODELS:
            return self.shared_model
        if self.fleet:
            return self.fleet_tiers[self.tier_of_partition(partition_id)][1]
        names = self.model_names
        return names[partition_id % len(names)]

    @property
    def width_rates(self) -> tuple[float, ...]:
        """HeteroFL's width rate per tier of ``fleet`` (``heterofl-rates``), smallest first."""
        return tuple(float(rate) for rate in self.heterofl_rates.split(",") if rate.strip())

    @property
    def tier_width_rates(self) -> tuple[float, ...]:
        """The width rate of each tier's model: HeteroFL's rates with a fleet, else one
        tier at width 1."""
        return self.width_rates if self.family == SUBMODELS and self.fleet else (1.0,)

    def width_of_partition(self, partition_id: int) -> float:
        """The width rate of partition ``partition_id``'s model: its tier's rate under
        HeteroFL with a fleet, else 1 (the whole model)."""
        if self.family != SUBMODELS or not self.fleet:
            return 1.0
        return self.width_rates[self.tier_of_partition(partition_id)]

    def tier_model(self, tier: int) -> str:
        """What tier ``tier`` of ``fleet`` trains: its model, or under HeteroFL the global
        architecture at the tier's rate (``resnet8@0.25``)."""
        if self.family == SUBMODELS:
            return f"{self.shared_model}@{self.width_rates[tier]:g}"
        return self.fleet_tiers[tier][1]

    def common_architecture(self, num_partitions: int) -> str:
        """``fedavg-common``: the architecture most of ``num_partitions`` partitions train
        (ties go to the larger tier: later in the fleet's order)."""
        counts = Counter(self.model_for_partition(p) for p in range(num_partitions))
        order = self.model_names
        return max(counts, key=lambda name: (counts[name], order.index(name)))

    def newcomers(self, num_partitions: int) -> frozenset[int]:
        """The partitions held back until ``newcomer-round``: ``newcomer-fraction`` of
        ``num_partitions`` (at least one when the fraction is above 0), drawn from ``seed``."""
        if self.newcomer_fraction <= 0:
            return frozenset()
        count = min(num_partitions - 1, max(1, round(self.newcomer_fraction * num_partitions)))
        return frozenset(random.Random(f"kta-flwr newcomers {self.seed}").sample(range(num_partitions), count))

    def join_rounds(self, num_partitions: int) -> dict[int, int]:
        """Partition -> the round it joins the fleet, for the :meth:`newcomers` (the
        others are there from round 1)."""
        return dict.fromkeys(sorted(self.newcomers(num_partitions)), self.newcomer_round)

    @property
    def keeps_node_model(self) -> bool:
        """True when nodes keep a model of their own between rounds (all but the stock
        parameter strategies and HeteroFL, whose clients train what the server sends)."""
        return self.family not in (PARAMETERS, SUBMODELS)

    @property
    def family(self) -> str:
        """The strategy's family: :data:`MARKET`, :data:`PARAMETERS` or :data:`COMPRESSED`."""
        return STRATEGY_FAMILIES[self.strategy]

    @property
    def is_market(self) -> bool:
        """True for strategies whose clients keep their own models (no weights sent)."""
        return self.family == MARKET

    @property
    def is_personal(self) -> bool:
        """True for parameter-sharing personalization (fedavg-ft, Ditto, FedRep)."""
        return self.family == PERSONAL

    @property
    def shares_body_only(self) -> bool:
        """True when only the model's body crosses the wire (FedRep; the head is personal)."""
        return self.strategy == "fedrep"

    @property
    def private(self) -> bool:
        """True when clients train with DP-SGD (``dp-epsilon`` or ``dp-noise`` set)."""
        return self.dp_epsilon > 0 or self.dp_noise > 0

    @property
    def labeled_reference(self) -> bool:
        """True when the reference set's labels are public (``reference-labels``): the
        server scores teachers on them and clients may read them."""
        return self.reference_labels == REFERENCE_LABELS_PUBLIC

    @property
    def label_mix(self) -> bool:
        """True when stage 2 weights its rows by the client's own label mix
        (``distill-label-mix``; ``"auto"``: on, but off under DP-SGD, which does not cover
        the private label frequencies the weights read)."""
        if not self.exchanges_knowledge:
            return False
        if self.distill_label_mix == AUTO:
            return not self.private
        return bool(self.distill_label_mix)

    @property
    def privacy_metrics(self) -> tuple[str, ...]:
        """Train metrics every client sends under DP: ``dp-epsilon`` and
        ``dp-lifetime-epsilon`` (DP-SGD: this run's, and the data's over every run) and
        ``logit-epsilon`` (noise on the uploaded logits), where on."""
        return (("dp-epsilon", "dp-lifetime-epsilon") if self.private else ()) + (
            ("logit-epsilon",) if self.logit_noise > 0 else ())

    @property
    def is_compressed(self) -> bool:
        """True for the baselines that send compressed model updates."""
        return self.family == COMPRESSED

    @property
    def exchanges_knowledge(self) -> bool:
        """True for the market strategies that upload logits (all but ``local``)."""
        return self.strategy in KNOWLEDGE_STRATEGIES

    @property
    def has_private_teacher(self) -> bool:
        """True when clients keep a private model next to the shared one (FedKD)."""
        return self.strategy in PRIVATE_TEACHER_STRATEGIES

    @property
    def update_compressor(self) -> str:
        """The compressed strategies' compressor: ``topk`` or ``svd``."""
        return UPDATE_COMPRESSORS[self.strategy]

    @property
    def shared_model(self) -> str:
        """The architecture whose weights the parameter strategies share: FedKD's student
        (``student-model``, default: the first of ``models``), HeteroFL's global model
        (with a fleet: its largest tier's model), else the one model."""
        if self.has_private_teacher and self.student_model:
            return self.student_model
        if self.family == SUBMODELS and self.fleet:
            return self.fleet_tiers[-1][1]
        return self.model_names[0]

    @property
    def transfer_per_round(self) -> int:
        """Transfer rows exchanged per round: ``transfer-rows`` with a transfer set under a
        strategy that uploads predictions, else 0."""
        return self.transfer_rows if self.transfer_source and self.exchanges_knowledge else 0

    def resolved_transfer_path(self, root: Path = DATA_ROOT) -> str:
        """``transfer-path`` as an absolute path (relative: from ``root``, as ``data-path``)."""
        path = Path(self.transfer_path).expanduser()
        return str(path if path.is_absolute() else root.expanduser() / path)

    @property
    def holdout(self) -> float:
        """Share of reference rows held out from distillation: ``holdout-fraction`` under
        kta's adaptive market (which scores its candidates there), else 0."""
        return self.holdout_fraction if self.strategy == "kta" and self.market == "adaptive" else 0.0

    @property
    def step_ahead(self) -> float:
        """SA-PEF's alpha: ``sapef-alpha`` under ``sapef``, 0 (plain EF) otherwise."""
        return self.sapef_alpha if self.strategy == "sapef" else 0.0

    def evaluates_in(self, server_round: int) -> bool:
        """True if clients evaluate in ``server_round`` (:func:`evaluation_round`)."""
        return evaluation_round(server_round, self.evaluate_every, self.num_server_rounds)

    def resolved_output_dir(self) -> Path:
        """``output-dir`` as an absolute path; relative paths are taken from ``$HOME``.

        The ServerApp runs in the SuperLink's working directory, not the caller's, so a
        path relative to the current directory would land somewhere surprising.
        """
        path = Path(self.output_dir).expanduser()
        return path if path.is_absolute() else Path.home() / path

    def resolved_model_dir(self) -> Path:
        """``model-dir`` as an absolute path (relative: from ``$HOME``, as ``output-dir``)."""
        path = Path(self.model_dir).expanduser()
        return path if path.is_absolute() else Path.home() / path

    def resolved_data_path(self, root: Path = DATA_ROOT) -> str:
        """``data-path`` as an absolute path ("" and hub names stay as they are); relative
        paths are taken from ``root`` (default :data:`DATA_ROOT`, ``~/kta-flwr/data``), for
        the same reason as ``output-dir``."""
        if not self.data_path or is_hub_path(self.data_path):
            return self.data_path
        path = Path(self.data_path).expanduser()
        return str(path if path.is_absolute() else root.expanduser() / path)

    def rooted(self, root: Path = DATA_ROOT) -> RunConfig:
        """A copy whose ``data-path`` and ``transfer-path`` are taken from ``root`` when
        relative (a tool's ``--data-root``), so the ServerApp and ClientApps read the same
        files wherever they run."""
        return self.replace(data_path=self.resolved_data_path(root),
                            transfer_path=self.resolved_transfer_path(root) if self.transfer_path else "")

    def to_flwr(self) -> dict[str, Any]:
        """The config as Flower run-config keys (kebab-case)."""
        return {_kebab(f.name): getattr(self, f.name) for f in fields(self)}

    def replace(self, **changes: Any) -> RunConfig:
        """A copy with ``changes`` applied (snake_case names), validated."""
        return _validate(dataclasses.replace(self, **changes))


def evaluation_round(server_round: int, every: int, last_round: int) -> bool:
    """Clients evaluate every ``every`` rounds and in the last round ``last_round``."""
    return server_round % every == 0 or server_round == last_round


def _kebab(name: str) -> str:
    return name.replace("_", "-")


#: Keys added with a default other than what runs did before them: the value a config
#: written before the key existed ran with (:func:`stored_run_config`).
BEFORE_KEY_EXISTED: dict[str, Any] = {"label-share": 0.0, "distill-label-mix": False, "bn-recalibrate": False}


def stored_run_config(run_config: Mapping[str, Any]) -> dict[str, Any]:
    """A run config as a run saved it (``results.json``'s ``config``), with every key of
    :data:`BEFORE_KEY_EXISTED` it lacks set to what that run ran with; keys of today
    that it lacks and that are not listed behaved as their defaults do now."""
    return {**BEFORE_KEY_EXISTED, **run_config}


def parse_run_config(run_config: Mapping[str, Any]) -> RunConfig:
    """Build a validated :class:`RunConfig` from Flower's ``context.run_config``.

    Keys missing from ``run_config`` take their defaults; unknown keys are rejected.

    Raises:
        ConfigError: naming the first bad key, its value and what is allowed.
    """
    by_key = {_kebab(f.name): f for f in fields(RunConfig)}
    unknown = sorted(set(run_config) - set(by_key))
    if unknown:
        raise ConfigError(
            f"unknown run-config key(s) {unknown}; known keys: {sorted(by_key)}"
        )
    values: dict[str, Any] = {}
    for key, value in run_config.items():
        field = by_key[key]
        values[field.name] = _coerce(key, value, type(getattr(RunConfig(), field.name)))
    return _validate(RunConfig(**values))


def _coerce(key: str, value: Any, kind: type) -> Any:
    """Check ``value`` against the default's type (ints are accepted for floats; the
    :data:`SWITCHES` take a bool or ``"auto"``)."""
    if key in SWITCHES:
        if isinstance(value, bool) or value == AUTO:
            return value
        raise ConfigError(f"run-config '{key}' = {value!r} must be true, false or {AUTO!r}")
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ConfigError(
            f"run-config '{key}' = {value!r} has type {type(value).__name__}; "
            f"expected {kind.__name__}"
        )
    return value


def _choice(key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(
            f"run-config '{key}' = {value!r} is not allowed; choose one of {list(allowed)}"
        )


def _positive(key: str, value: float) -> None:
    if not (value > 0 and math.isfinite(value)):
        raise ConfigError(f"run-config '{key}' = {value!r} must be a positive number")


def _non_negative(key: str, value: float) -> None:
    if not (value >= 0 and math.isfinite(value)):
        raise ConfigError(f"run-config '{key}' = {value!r} must be >= 0")


def _check_privacy(cfg: RunConfig) -> None:
    """The DP keys: one way to set the noise, a usable delta and clip, and the
    strategies they apply to."""
    if cfg.dp_epsilon > 0 and cfg.dp_noise > 0:
        raise ConfigError(
            f"run-config 'dp-epsilon' = {cfg.dp_epsilon!r} and 'dp-noise' = {cfg.dp_noise!r} "
            "are both set; give a target epsilon or a noise multiplier, not both")
    if not 0.0 <= cfg.dp_delta < 1.0:
        raise ConfigError(f"run-config 'dp-delta' = {cfg.dp_delta!r} must be in [0, 1) "
                          "(0: 1 / the client's number of training examples)")
    _positive("dp-clip", cfg.dp_clip)
    _positive("logit-clip", cfg.logit_clip)
    _non_negative("dp-lifetime-epsilon", cfg.dp_lifetime_epsilon)
    if cfg.dp_lifetime_epsilon > 0 and not cfg.private:
        raise ConfigError(
            f"run-config 'dp-lifetime-epsilon' = {cfg.dp_lifetime_epsilon!r} bounds what DP-SGD "
            "spends over a node's runs; set 'dp-epsilon' or 'dp-noise' too")
    if 0 < cfg.dp_lifetime_epsilon < cfg.dp_epsilon:
        raise ConfigError(
            f"run-config 'dp-lifetime-epsilon' = {cfg.dp_lifetime_epsilon!r} is below this run's "
            f"target 'dp-epsilon' = {cfg.dp_epsilon!r}: no node could ever train")
    if cfg.private and cfg.has_private_teacher:
        raise ConfigError(
            f"run-config 'dp-epsilon'/'dp-noise' cannot be used with strategy {cfg.strategy!r}: "
            "its adaptive mutual-distillation loss divides by the batch's mean loss, so one "
            "sample's gradient depends on the others and per-sample clipping bounds nothing")
    if cfg.private and cfg.family == PROTOTYPES:
        raise ConfigError(
            f"run-config 'dp-epsilon'/'dp-noise' cannot be used with strategy {cfg.strategy!r}: "
            "its uploads are class means of the private data's embeddings, which DP-SGD "
            "does not cover")
    if cfg.private and cfg.distill_label_mix is True:
        raise ConfigError(
            "run-config 'distill-label-mix' = true cannot be used with 'dp-epsilon'/'dp-noise': it "
            "weights stage 2's public rows by the private label mix, which DP-SGD does not cover "
            f"({AUTO!r}, the default, turns it off under DP-SGD)")
    if cfg.logit_noise > 0 and not cfg.exchanges_knowledge:
        raise ConfigError(
            f"run-config 'logit-noise' = {cfg.logit_noise!r} applies to strategies that upload "
            f"logits {list(KNOWLEDGE_STRATEGIES)}, not {cfg.strategy!r}")


def _check_stage2(cfg: RunConfig) -> None:
    """The distillation stage's switches that are off by default, turned on for a strategy
    without that stage (the markets that exchange knowledge have it): refused, since
    nothing would read them."""
    if cfg.exchanges_knowledge:
        return
    for key, on in (("distill-label-mix", cfg.distill_label_mix is True),
                    ("distill-augment", cfg.distill_augment),
                    ("reference-ce-weight", cfg.reference_ce_weight > 0)):
        if on:
            raise ConfigError(
                f"run-config {key!r} applies to the distillation stage of the strategies that "
                f"exchange knowledge {list(KNOWLEDGE_STRATEGIES)}; strategy "
                f"{cfg.strategy!r} has none")


def _check_newcomers(cfg: RunConfig) -> None:
    """Newcomers join in a round of the run; only the market can hand them the server's
    model, of their own architecture."""
    if not 0.0 <= cfg.newcomer_fraction < 1.0:
        raise ConfigError(f"run-config 'newcomer-fraction' = {cfg.newcomer_fraction!r} must be in [0, 1)")
    _choice("newcomer-start", cfg.newcomer_start, NEWCOMER_STARTS)
    if cfg.newcomer_fraction > 0 and not 2 <= cfg.newcomer_round <= cfg.num_server_rounds:
        raise ConfigError(
            f"run-config 'newcomer-round' = {cfg.newcomer_round!r} must be in [2, "
            f"'num-server-rounds' = {cfg.num_server_rounds}] when 'newcomer-fraction' > 0")
    if cfg.newcomer_start == "global":
        if not (cfg.exchanges_knowledge and cfg.server_model):
            raise ConfigError(
                "run-config 'newcomer-start' = 'global' sends newcomers the market's server model: "
                "it needs a strategy that uploads predictions and 'server-model' (strategy "
                f"{cfg.strategy!r}, server-model {cfg.server_model!r}); parameter strategies "
                "send their global model to every node anyway")
        if set(cfg.model_names) != {cfg.server_model}:
            raise ConfigError(
                f"run-config 'newcomer-start' = 'global' loads the server model "
                f"({cfg.server_model!r}) into each newcomer's own model, but the clients train "
                f"{sorted(set(cfg.model_names))}; use one architecture for both, or 'scratch'")


def _check_transfer(cfg: RunConfig) -> None:
    """The transfer set: a source, sizes that fit each other, and a strategy that
    uploads predictions (whose clients distil on what they receive)."""
    _choice("transfer-source", cfg.transfer_source, TRANSFER_SOURCES)
    if not cfg.transfer_source:
        return
    if not cfg.exchanges_knowledge and cfg.transfer_source != "pool":
        raise ConfigError(
            f"run-config 'transfer-source' = {cfg.transfer_source!r} needs a strategy that uploads "
            f"predictions ({sorted(KNOWLEDGE_STRATEGIES)}), not "
            f"{cfg.strategy!r} ('pool' may be given to any strategy: its rows are then held out of "
            "the clients' data and unused, for comparisons on the same partitions)")
    _positive("transfer-size", cfg.transfer_size)
    _non_negative("transfer-rows", cfg.transfer_rows)
    if cfg.transfer_rows > cfg.transfer_size:
        raise ConfigError(f"run-config 'transfer-rows' = {cfg.transfer_rows} exceeds 'transfer-size' "
                          f"= {cfg.transfer_size}: a round cannot exchange more rows than the set has")
    if cfg.transfer_source in ("emnist", "femnist", "file") and not cfg.transfer_path:
        raise ConfigError(f"run-config 'transfer-source' = {cfg.transfer_source!r} needs 'transfer-path' "
                          "(where its inputs are)")
    if cfg.transfer_source == "pool" and cfg.transfer_path:
        raise ConfigError("run-config 'transfer-path' is for the sources 'emnist', 'femnist' and 'file'; "
                          "'transfer-source' = 'pool' carves its rows out of the dataset itself")
    if cfg.reference_ce_weight > 0:
        raise ConfigError(
            f"run-config 'reference-ce-weight' = {cfg.reference_ce_weight!r} trains on the labels of "
            "the rows clients distil on, but the transfer set has none; set it to 0 with 'transfer-source'")


def _check_unlabeled(cfg: RunConfig) -> None:
    """``reference-labels = none``: only what needs no label on either side."""
    _choice("reference-labels", cfg.reference_labels, REFERENCE_LABELS)
    if cfg.labeled_reference:
        return
    needs = [("strategy", cfg.strategy, "KT-pFL learns its coefficients on the labels")
             if cfg.strategy == "ktpfl" else None,
             ("market", cfg.market, "kta scores its teachers on a reserve of rows per client, "
              "which the adaptive market holds out") if cfg.strategy == "kta" and cfg.market != "adaptive" else None,
             ("holdout-fraction", cfg.holdout_fraction, "kta's reserve of scored rows per client is that "
              "share of the rows") if cfg.strategy == "kta" and cfg.holdout_fraction <= 0 else None,
             ("teacher-quality", cfg.teacher_quality, "without labels a teacher is scored by "
              "'information' or 'accuracy' on the others' consensus") if cfg.teacher_quality == "likelihood" else None,
             ("class-quality", cfg.class_quality, "it scores teachers per labeled class") if cfg.class_quality else None,
             ("reference-ce-weight", cfg.reference_ce_weight, "clients would train on the labels")
             if cfg.reference_ce_weight > 0 else None,
             ("server-model", cfg.server_model, "the server's model is distilled toward the labels "
              "and their consensus") if cfg.server_model else None]
    for key, value, why in filter(None, needs):
        raise ConfigError(f"run-config '{key}' = {value!r} does not go with 'reference-labels' = 'none': {why}")


def _check_heterofl(cfg: RunConfig) -> None:
    """HeteroFL: a width-scalable global model and one rate in (0, 1] per tier."""
    if cfg.shared_model not in WIDTH_SCALABLE_MODELS:
        raise ConfigError(
            f"strategy 'heterofl' scales its global model {cfg.shared_model!r} by width, "
            f"which that model does not support; use one of {sorted(WIDTH_SCALABLE_MODELS)}")
    try:
        rates = cfg.width_rates
    except ValueError:
        raise ConfigError(f"run-config 'heterofl-rates' = {cfg.heterofl_rates!r} must be "
                          "comma-separated numbers") from None
    if not rates or any(not 0.0 < rate <= 1.0 for rate in rates):
        raise ConfigError(f"run-config 'heterofl-rates' = {cfg.heterofl_rates!r}: every rate "
                          "must be in (0, 1]")
    if cfg.fleet and len(rates) != len(cfg.fleet_tiers):
        raise ConfigError(
            f"run-config 'heterofl-rates' = {cfg.heterofl_rates!r} gives {len(rates)} rate(s) "
            f"but 'fleet' = {cfg.fleet!r} has {len(cfg.fleet_tiers)} tiers")


def _validate(cfg: RunConfig) -> RunConfig:
    """Check value ranges that do not depend on the data; returns ``cfg``."""
    _choice("strategy", cfg.strategy, STRATEGIES)
    _choice("dataset", cfg.dataset, DATASETS)
    _choice("partitioner", cfg.partitioner, PARTITIONERS)
    _positive("shards-per-partition", cfg.shards_per_partition)
    _positive("classes-per-partition", cfg.classes_per_partition)
    _choice("market", cfg.market, MARKETS)
    _choice("node-state", cfg.node_state, NODE_STATES)
    _choice("tracking", cfg.tracking, TRACKINGS)
    if not cfg.tracking_experiment.strip():
        raise ConfigError("run-config 'tracking-experiment' is empty; name the MLflow experiment")
    _choice("market-device", cfg.market_device, MARKET_DEVICES)
    _choice("divergence", cfg.divergence, DIVERGENCES)
    _choice("target-space", cfg.target_space, TARGET_SPACES)
    _choice("teacher-quality", cfg.teacher_quality, TEACHER_QUALITIES)
    _choice("server-model-teacher", cfg.server_model_teacher, SERVER_MODEL_TEACHERS)
    if cfg.background_teacher and (cfg.neighbours == 0 or cfg.target_space != "logit"):
        raise ConfigError("run-config 'background-teacher' = true needs 'neighbours' > 0 (it "
                          "stands in for the teachers beyond the m nearest) and 'target-space' = "
                          f"'logit'; got neighbours = {cfg.neighbours}, target-space = "
                          f"{cfg.target_space!r}")
    if cfg.class_quality and cfg.teacher_quality != "information":
        raise ConfigError("run-config 'class-quality' = true needs 'teacher-quality' = "
                          f"'information' (it splits that score by class); got {cfg.teacher_quality!r}")
    _choice("device", cfg.device, DEVICES)
    _choice("codec", cfg.codec, CODECS)
    _choice("update-aggregation", cfg.update_aggregation, UPDATE_AGGREGATIONS)
    if cfg.update_aggregation != "mean" and not cfg.is_compressed:
        raise ConfigError(
            f"run-config 'update-aggregation' = {cfg.update_aggregation!r} applies to the "
            f"compressed strategies {list(COMPRESSED_STRATEGIES)}; the stock family has "
            "'fedmedian' and 'fedtrimmedavg' as strategies of their own")
    for key, value in (
        ("num-server-rounds", cfg.num_server_rounds),
        ("local-epochs", cfg.local_epochs),
        ("batch-size", cfg.batch_size),
        ("learning-rate", cfg.learning_rate),
        ("distill-learning-rate", cfg.distill_learning_rate),
        ("min-nodes", cfg.min_nodes),
        ("round-timeout", cfg.round_timeout),
        ("evaluate-every", cfg.evaluate_every),
        ("node-wait-timeout", cfg.node_wait_timeout),
        ("min-round-nodes", cfg.min_round_nodes),
        ("dirichlet-alpha", cfg.dirichlet_alpha),
        ("reference-size", cfg.reference_size),
        ("vocab-size", cfg.vocab_size),
        ("text-length", cfg.text_length),
        ("temperature", cfg.temperature),
        ("similarity-tau", cfg.similarity_tau),
        ("codec-topk", cfg.codec_topk),
    ):
        _positive(key, value)
    for key, value in (
        ("topk-fraction", cfg.topk_fraction),
        ("reference-fraction", cfg.reference_fraction),
        ("svd-energy", cfg.svd_energy),
        ("svd-energy-end", cfg.svd_energy_end),
        ("lr-decay", cfg.lr_decay),
    ):
        if not (0.0 < value <= 1.0):
            raise ConfigError(f"run-config '{key}' = {value!r} must be in (0, 1]")
    for key, value in (("sapef-alpha", cfg.sapef_alpha), ("score-uniform-share", cfg.score_uniform_share)):
        if not 0.0 <= value <= 1.0:
            raise ConfigError(f"run-config '{key}' = {value!r} must be in [0, 1]")
    if not 0.0 <= cfg.label_share < 1.0:
        raise ConfigError(f"run-config 'label-share' = {cfg.label_share!r} must be in [0, 1) "
                          "(1 would send the labels alone, with nothing from the teachers)")
    for key, value in (
        ("distill-epochs", cfg.distill_epochs),
        ("server-model-epochs", cfg.server_model_epochs),
        ("server-model-label-weight", cfg.server_model_label_weight),
        ("server-model-learning-rate", cfg.server_model_learning_rate),
        ("momentum", cfg.momentum),
        ("weight-decay", cfg.weight_decay),
        ("proximal-mu", cfg.proximal_mu),
        ("finetune-epochs", cfg.finetune_epochs),
        ("ditto-lambda", cfg.ditto_lambda),
        ("head-epochs", cfg.head_epochs),
        ("distill-weight", cfg.distill_weight),
        ("reference-ce-weight", cfg.reference_ce_weight),
        ("private-ce-weight", cfg.private_ce_weight),
        ("neighbours", cfg.neighbours),
        ("divergence-rows", cfg.divergence_rows),
        ("accuracy-exponent", cfg.accuracy_exponent),
        ("seed", cfg.seed),
        ("test-size", cfg.test_size),
        ("max-train-size", cfg.max_train_size),
        ("finetune-layers", cfg.finetune_layers),
        ("distill-clip", cfg.distill_clip),
        ("max-staleness", cfg.max_staleness),
        ("sybil-divergence", cfg.sybil_divergence),
        ("loudness-cap", cfg.loudness_cap),
        ("krum-malicious", cfg.krum_malicious),
        ("attack-scale", cfg.attack_scale),
        ("attack-noise", cfg.attack_noise),
        ("dp-epsilon", cfg.dp_epsilon),
        ("dp-noise", cfg.dp_noise),
        ("logit-noise", cfg.logit_noise),
    ):
        _non_negative(key, value)
    _check_privacy(cfg)
    _check_stage2(cfg)
    for key, value in (("fault-dropout", cfg.fault_dropout), ("fault-straggler", cfg.fault_straggler)):
        if not 0.0 <= value < 1.0:
            raise ConfigError(f"run-config '{key}' = {value!r} must be in [0, 1)")
    _choice("attack", cfg.attack, ATTACKS)
    if not 0.0 <= cfg.attack_fraction < 1.0:
        raise ConfigError(f"run-config 'attack-fraction' = {cfg.attack_fraction!r} must be in [0, 1)")
    if not 0.0 <= cfg.attack_budget <= 1.0:
        raise ConfigError(f"run-config 'attack-budget' = {cfg.attack_budget!r} must be in [0, 1]")
    if not 0.0 <= cfg.trim_beta < 0.5:
        raise ConfigError(f"run-config 'trim-beta' = {cfg.trim_beta!r} must be in [0, 0.5)")
    if cfg.attack != "none" and cfg.family not in ATTACK_FAMILIES[cfg.attack]:
        raise ConfigError(
            f"run-config 'attack' = {cfg.attack!r} does not apply to strategy {cfg.strategy!r} "
            f"(family {cfg.family!r}); it applies to {sorted(ATTACK_FAMILIES[cfg.attack])}"
        )
    if cfg.min_round_nodes > cfg.min_nodes:
        raise ConfigError(
            f"run-config 'min-round-nodes' = {cfg.min_round_nodes} exceeds 'min-nodes' = "
            f"{cfg.min_nodes}: a round waits for 'min-nodes' and, after 'node-wait-timeout', "
            "proceeds with at least 'min-round-nodes'"
        )
    if not cfg.model_dir:
        raise ConfigError("run-config 'model-dir' is empty; name a folder for the nodes' models")
    if not 0.0 <= cfg.holdout_fraction < 1.0:
        raise ConfigError(
            f"run-config 'holdout-fraction' = {cfg.holdout_fraction!r} must be in [0, 1)"
        )
    for key, fraction in (("fraction-train", cfg.fraction_train),
                          ("fraction-evaluate", cfg.fraction_evaluate)):
        if not 0.0 < fraction <= 1.0:
            raise ConfigError(f"run-config '{key}' = {fraction!r} must be in (0, 1]")
    if not (cfg.self_weight == -1.0 or 0.0 <= cfg.self_weight <= 1.0):
        raise ConfigError(
            f"run-config 'self-weight' = {cfg.self_weight!r} must be in [0, 1], "
            "or -1 to weigh a client's own predictions by similarity like any other"
        )
    if cfg.momentum >= 1.0:
        raise ConfigError(f"run-config 'momentum' = {cfg.momentum!r} must be < 1")
    if cfg.fleet:
        _choice("fleet", cfg.fleet, tuple(FLEETS))
        if cfg.dataset not in FLEETS[cfg.fleet]:
            raise ConfigError(
                f"run-config 'fleet' = {cfg.fleet!r} has no tiers for dataset {cfg.dataset!r}; "
                f"it has {sorted(FLEETS[cfg.fleet])}"
            )
    names = cfg.model_names
    if not names:
        raise ConfigError("run-config 'models' is empty; name at least one model")
    checked = [("models", name) for name in names]
    if cfg.student_model:
        checked.append(("student-model", cfg.student_model))
    _check_newcomers(cfg)
    _check_transfer(cfg)
    _check_unlabeled(cfg)
    if cfg.server_model:
        if not cfg.exchanges_knowledge:
            raise ConfigError(
                f"run-config 'server-model' = {cfg.server_model!r} needs a strategy that uploads "
                f"predictions ({sorted(KNOWLEDGE_STRATEGIES)}); "
                f"strategy {cfg.strategy!r} has "
                + ("none" if cfg.is_market else "a global model of its own"))
        checked.append(("server-model", cfg.server_model))
    if not 0.0 <= cfg.server_model_teacher_weight < 1.0:
        raise ConfigError(f"run-config 'server-model-teacher-weight' = {cfg.server_model_teacher_weight!r} "
                          "must be in [0, 1)")
    if cfg.server_model_teacher_weight > 0 and not cfg.server_model:
        raise ConfigError("run-config 'server-model-teacher-weight' > 0 mixes the server model's "
                          "predictions into the targets: set 'server-model' too")
    for key, name in checked:
        _choice(key, name, MODELS)
        if (name in TEXT_MODELS) != (cfg.dataset in TEXT_DATASETS):
            kind = "text" if cfg.dataset in TEXT_DATASETS else "image"
            fits = sorted(TEXT_MODELS) if kind == "text" else sorted(set(MODELS) - TEXT_MODELS)
            raise ConfigError(
                f"run-config '{key}' names {name!r}, which cannot read the {kind} inputs "
                f"of dataset {cfg.dataset!r}; use one of {fits}"
            )
    shares_weights = cfg.family in (PARAMETERS, PERSONAL) or (
        cfg.is_compressed and not cfg.has_private_teacher)
    if shares_weights and len(set(names)) > 1:
        given = (f"'fleet' = {cfg.fleet!r} gives the clients "
                 + ", ".join(f"{model} ({tier})" for tier, model in cfg.fleet_tiers)
                 if cfg.fleet else f"'models' = {cfg.models!r} gives the clients {', '.join(names)}")
        raise ConfigError(
            f"run-config {given}, but strategy {cfg.strategy!r} averages weights and needs "
            f"one architecture; use a market strategy {list(MARKET_STRATEGIES)} or 'fedkd' "
            "for mixed models"
        )
    if cfg.family == SUBMODELS:
        _check_heterofl(cfg)
    _positive("prototype-dim", cfg.prototype_dim)
    _non_negative("prototype-weight", cfg.prototype_weight)
    if cfg.strategy == "ditto" and cfg.ditto_lambda * cfg.learning_rate >= 2.0:
        raise ConfigError(
            f"run-config 'ditto-lambda' = {cfg.ditto_lambda!r} times 'learning-rate' = "
            f"{cfg.learning_rate!r} must be < 2: gradient steps on Ditto's penalty "
            "lambda/2 ||v - w||² diverge beyond that"
        )
    if cfg.strategy == "kta" and cfg.distill_epochs == 0:
        raise ConfigError(
            "run-config 'distill-epochs' = 0 disables the market's distillation stage; "
            "use strategy='local' for a no-communication run"
        )
    return cfg
