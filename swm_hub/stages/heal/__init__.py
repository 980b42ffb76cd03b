"""The heal stage: win back what merging lost, by distilling the original model into the compressed one.

LoRA adapters (PEFT) on the compressed model, the student, are trained so that its next-token
distributions match those of the original model, the teacher (the base model ``swm_plan.json`` names):
KL(teacher || student) at temperature 1, plus, with ``hidden_weight``, the MSE between the student's and
the teacher's hidden states where each merged window ends (relative to the teacher's mean square there).
The training text is the calibration text of the plan, or a file the user gives; never the held-out text
the evaluation measures on. At the end the adapters are merged into the weights, so the healed folder is a
plain model that loads with ``AutoModelForCausalLM`` and exports as any other.

By default every decoder layer gets adapters: the layers around a merged window read inputs that changed
too, and on SmolLM2 at 9 of 30 removed this healed the merged model clearly better than adapting only the
consolidated layers at the same budget (README, heal). ``modules="merged"`` adapts only the consolidated
layers (the lowest layer of each merged window, in the compressed model's numbering), the layers that now
do the work of several. The loop itself (``training``) runs under ``accelerate``: ``accelerate launch -m
swm_hub heal ...`` trains data-parallel on several GPUs with the same code a CPU run uses.
"""

from __future__ import annotations

import gc
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn
from transformers import AutoConfig, AutoTokenizer, PreTrainedModel

from swm_hub.core.devices import DTYPES, has_bf16_arithmetic
from swm_hub.core.errors import (
    CalibrationDataError,
    HealInterrupted,
    InvalidMergeError,
    InvalidOptionError,
    MissingDependencyError,
)
from swm_hub.core.model import LoadedModel
from swm_hub.core.options import (
    CalibrationOptions,
    ExecutionOptions,
    HealOptions,
    check_block_length,
)
from swm_hub.results.heal import HealComparison
from swm_hub.results.plan import PLAN_FILE, MergePlan
from swm_hub.runtime.checkpoint import (
    build_skeleton,
    check_layer_count,
    output_folder,
    save_model_folder,
    verify_folder_loads,
)
from swm_hub.runtime.execution import execution_of
from swm_hub.runtime.loading import pull
from swm_hub.runtime.tracing import calibration_batches
from swm_hub.stages.heal.adapters import (
    adapted_module_names,
    add_adapters,
    consolidated_positions,
    save_adapter,
    unshare_adapted,
    window_boundaries,
)
from swm_hub.stages.heal.record import heal_record, run_identity
from swm_hub.stages.heal.teacher import (
    CacheLayout,
    MemoryTeacher,
    block_fingerprint,
    build_cache,
    choose_teacher_cache,
    complete_cache,
    estimate_memory,
    open_cache,
)
from swm_hub.stages.heal.training import (
    CheckpointStore,
    StepReport,
    Teacher,
    TrainingPlan,
    train,
)

__all__ = [
    "ADAPTER_FOLDER",
    "CardWriter",
    "ComparerFactory",
    "HealComparing",
    "HealFunction",
    "HealInterrupted",
    "HealRequest",
    "HealResult",
    "StepReport",
    "adapted_module_names",
    "checkpoint_folder",
    "consolidated_positions",
    "heal",
    "heal_into",
    "heal_model",
]

CardWriter = Callable[[Path, str], object]
"""Writes the model card of a healed folder, given the name of its final place (the card stage's, via the pipeline)."""


HealFunction = Callable[[PreTrainedModel, MergePlan], "tuple[PreTrainedModel, HealResult]"]
"""Heals a compressed model of the given plan (the student, or the drop baseline), with the same options."""


class HealComparing(Protocol):
    """Heals the student and a drop baseline alike and measures both (the pipeline's ``HealComparer``)."""

    def compare(
        self,
        plan: MergePlan,
        student: PreTrainedModel,
        tokens: int,
        heal_student: HealFunction,
        heal_baseline: HealFunction,
    ) -> tuple[PreTrainedModel, HealResult, HealComparison]: ...


ComparerFactory = Callable[[LoadedModel], HealComparing]
"""Makes the comparison for the base model, once ``heal`` has loaded it as the teacher."""

ADAPTER_FOLDER = "adapter"
CACHE_FOLDER = "teacher-cache"
PEFT_INSTALL = 'pip install "swm-hub[heal]"'


@dataclass(frozen=True)
class HealResult:
    """What a heal did: its record (the one added to the plan) and where the healed model is."""

    output_dir: Path | None
    plan: MergePlan
    record: dict[str, Any]

    @property
    def loss(self) -> dict[str, Any]:
        return dict(self.record["loss"])

    @property
    def tokens_per_s(self) -> float:
        return float(self.record["tokens_per_s"])

    def lines(self) -> list[str]:
        """The summary the CLI prints."""
        record, loss = self.record, self.loss
        resumed = f", resumed at step {record['resumed_at']}" if record.get("resumed_at") is not None else ""
        return [
            f"healed {record['adapted_modules']} modules ({record['trainable_parameters']:,} LoRA parameters, "
            f"teacher {record['teacher_cache']}, autocast {record['autocast']}) on {record['tokens_seen']:,} tokens in {record['steps']} steps"
            f"{resumed}",
            f"loss {loss['first']:.4f} -> {loss['last']:.4f} (min {loss['min']:.4f}); "
            f"{record['seconds']:.1f} s, {record['tokens_per_s']:.0f} tokens/s",
        ]


# --- public entry points ------------------------------------------------------------------------------------


def checkpoint_folder(out: Path) -> Path:
    """Where the checkpoints of a heal into ``out`` go: a hidden folder beside it, kept until the output is in place."""
    out = Path(out).absolute()
    return out.parent / f".{out.name}.heal-checkpoint"


def heal(
    folder: Path,
    out: Path | None = None,
    options: HealOptions | None = None,
    overwrite: bool = False,
    resume: bool = False,
    keep_adapter: bool = False,
    progress: bool = False,
    on_step: Callable[[StepReport], None] | None = None,
    compare: ComparerFactory | None = None,
    card: CardWriter | None = None,
) -> HealResult:
    """Heal the compressed model in ``folder`` into a new folder ``out`` (default: ``FOLDER-healed``).

    The output is written like every output (a temporary folder beside ``out``, moved into place once). The
    checkpoints go into ``checkpoint_folder(out)`` and are deleted once the output is in place. Under
    ``accelerate launch`` every process trains and the main one writes; the others return a result
    without ``output_dir``. With ``compare`` (the pipeline's, which builds and measures the drop baseline
    with the merge and evaluate stages), the baseline is healed the same way and the comparison is saved as
    ``heal.json``. With ``card``, the healed folder gets its model card.

    Raises:
        HealInterrupted: Ctrl-C stopped the training; run again with ``resume=True``.
    """
    options = options or HealOptions()
    folder = Path(folder)
    out = Path(out) if out is not None else folder.with_name(f"{folder.name}-healed")
    plan = MergePlan.in_folder(folder)
    _require_peft()
    refuse_sharded_launch()
    if compare is not None and options.teacher_cache == "disk":
        raise InvalidOptionError(
            "--compare measures the base model and heals a drop baseline from it, so it needs the base model in "
            "memory: drop --teacher-cache disk, or drop --compare"
        )
    store_folder = checkpoint_folder(out)
    refuse_checkpoint_state(store_folder, resume)
    check_block_length(AutoConfig.from_pretrained(folder), options.seq_len)
    protected = [path for path in (folder, Path(plan.model).expanduser()) if path.exists()]
    main = bool(make_accelerator(options.execution).is_main_process)
    with output_folder(out, overwrite, protected=protected) if main else nullcontext(None) as temp:
        student, teacher = _load_models(
            folder, plan, options, store_folder, resume, progress, compare is not None
        )
        original = teacher.model if isinstance(teacher, LoadedModel) else teacher

        def heal_student(model: PreTrainedModel, model_plan: MergePlan) -> tuple[PreTrainedModel, HealResult]:
            adapter = temp / ADAPTER_FOLDER if keep_adapter and temp is not None else None
            return heal_model(
                model,
                original,
                model_plan,
                student.tokenizer,
                options,
                store_folder=store_folder,
                resume=resume,
                progress=progress,
                on_step=on_step,
                adapter_dir=adapter,
                adapter_base=folder.absolute().name,  # a name, not the user's path: the folder may be pushed
            )

        if compare is not None and isinstance(teacher, LoadedModel):

            def heal_baseline(
                model: PreTrainedModel, model_plan: MergePlan
            ) -> tuple[PreTrainedModel, HealResult]:
                return heal_model(
                    model, teacher.model, model_plan, student.tokenizer, options, progress=progress
                )

            healed, result, comparison = compare(teacher).compare(
                plan, student.model, options.tokens, heal_student, heal_baseline
            )
            if temp is not None:
                comparison.save(temp)
        else:
            healed, result = heal_student(student.model, plan)
        if temp is not None:
            write_healed(healed, student, result.plan, temp)
            if card is not None:
                card(temp, out.name)
    make_accelerator(options.execution).wait_for_everyone()
    if not main:
        return result
    CheckpointStore(store_folder, {}).remove()
    return replace(result, output_dir=out)


@dataclass(frozen=True)
class HealRequest:
    """How ``compress --heal`` heals what it merged, before the evaluation, the export and the card."""

    options: HealOptions = field(default_factory=HealOptions)
    resume: bool = False
    keep_adapter: bool = False

    def check(self, out: Path, execution: ExecutionOptions) -> None:
        """What can be refused before the merge: no peft, layer-wise execution, a checkpoint in the way."""
        _require_peft()
        refuse_sharded_launch()
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise InvalidOptionError(
                "compress --heal runs in one process, not under accelerate launch: run compress without --heal "
                f"(one process), then heal its output with `accelerate launch -m swm_hub heal {out}`"
            )
        if execution.mode == "layerwise":
            raise InvalidOptionError(
                "--heal trains with the base model whole in memory as the teacher: drop --execution layerwise, "
                "or compress layer-wise and heal the result with `swm-hub heal --teacher-cache disk`"
            )
        refuse_checkpoint_state(checkpoint_folder(out), self.resume)

    def run(self, folder: Path, teacher: LoadedModel, out: Path, progress: bool) -> HealResult:
        """Heal the merged model in ``folder`` (compress's temporary folder), checkpointing beside ``out``."""
        return heal_into(
            folder, teacher, self.options, checkpoint_folder(out), self.resume, progress, self.keep_adapter
        )

    def finish(self, out: Path) -> None:
        """Once ``out`` is in place, its checkpoints are no longer needed."""
        CheckpointStore(checkpoint_folder(out), {}).remove()


def heal_into(
    folder: Path,
    teacher: LoadedModel,
    options: HealOptions,
    store_folder: Path,
    resume: bool = False,
    progress: bool = False,
    keep_adapter: bool = False,
) -> HealResult:
    """Heal the model ``compress`` just wrote into its temporary ``folder``, in place, with the base model it holds.

    Pulling ``folder`` checks what the merge wrote (the merge leaves its reload check to this pull), and its
    layer count is checked before any training. The caller moves ``folder`` into place and then deletes
    ``store_folder``.
    """
    _require_peft()
    teacher_model = execution_of(teacher).in_memory(
        "--heal needs the base model whole in memory as the teacher, and it was loaded layer-wise: pass "
        "--execution whole, or heal the compressed folder with `swm-hub heal --teacher-cache disk`"
    )
    plan = MergePlan.in_folder(folder)
    execution = replace(options.execution, mode="whole")
    student = pull(str(folder), dtype=DTYPES[execution.dtype], device="cpu", execution="whole")
    check_layer_count(folder, student.model, plan.layers_after)
    refuse_checkpoint_state(store_folder, resume)
    healed, result = heal_model(
        student.model,
        teacher_model,
        plan,
        teacher.tokenizer,
        options,
        store_folder=store_folder,
        resume=resume,
        progress=progress,
        adapter_dir=folder / ADAPTER_FOLDER if keep_adapter else None,
    )
    _remove_weights(folder)
    write_healed(healed, student, result.plan, folder)
    return replace(result, output_dir=folder)


def heal_model(
    student: PreTrainedModel,
    teacher: nn.Module | Teacher,
    plan: MergePlan,
    tokenizer: Any,
    options: HealOptions,
    store_folder: Path | None = None,
    resume: bool = False,
    progress: bool = False,
    on_step: Callable[[StepReport], None] | None = None,
    adapter_dir: Path | None = None,
    adapter_base: str | None = None,
) -> tuple[PreTrainedModel, HealResult]:
    """Heal ``student`` (the compressed model of ``plan``) against ``teacher``; return it merged, and the record.

    ``teacher`` is the original model (kept in memory, or turned into a disk cache first when
    ``options.teacher_cache`` says ``disk``) or a ready ``Teacher``. ``student`` is changed in place: the
    returned model shares its weights, with the adapters merged into them.
    """
    accelerator = make_accelerator(options.execution)
    blocks, text = training_blocks(tokenizer, plan, options)
    boundaries = window_boundaries(plan)
    hidden_layers = (
        tuple(teacher_layer for _, teacher_layer in boundaries) if options.hidden_weight > 0 else ()
    )
    mode, source = _teacher_source(
        teacher, student, plan, blocks, hidden_layers, options, accelerator, store_folder, progress
    )
    names = adapted_module_names(student, plan, options.modules)
    if isinstance(teacher, nn.Module):
        unshare_adapted(student, teacher, names)
    peft_model = add_adapters(student.to(accelerator.device), names, options)
    autocast = autocast_dtype(options, accelerator.device)
    training = TrainingPlan(
        steps=options.steps,
        batch_size=_per_step_blocks(options, accelerator),
        lr=options.lr,
        seed=options.seed,
        hidden_weight=options.hidden_weight,
        checkpoint_every=options.checkpoint_every,
        boundaries=boundaries,
        autocast=autocast,
    )
    identity = run_identity(plan, options, mode, text, blocks, autocast)
    store = CheckpointStore(store_folder, identity) if store_folder is not None else None
    log = train(peft_model, source, blocks, training, accelerator, store, resume, progress, on_step)
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    if adapter_dir is not None and accelerator.is_main_process:
        save_adapter(peft_model, adapter_dir, adapter_base)
    healed: PreTrainedModel = peft_model.merge_and_unload()
    healed.train(False)
    healed.requires_grad_(False)
    record = heal_record(plan, options, log, text, blocks, mode, len(names), trainable, accelerator, autocast)
    return healed, HealResult(output_dir=None, plan=replace(plan, heal=record), record=record)


# --- the pieces -------------------------------------------------------------------------------------------------


def refuse_checkpoint_state(store_folder: Path, resume: bool) -> None:
    """A checkpoint means an interrupted run: resume it or remove it on purpose, never overwrite it silently."""
    store = CheckpointStore(store_folder, {})
    if resume and not store.exists():
        raise InvalidOptionError(
            f"--resume: there is no heal checkpoint in {store_folder}; run without --resume"
        )
    if not resume and store.exists():
        raise InvalidOptionError(
            f"an interrupted heal left a checkpoint in {store_folder} (step {store.saved_step()}): pass --resume "
            "to continue it, or delete that folder to start again"
        )


SHARDING_ENGINES: tuple[tuple[str, str], ...] = (
    ("ACCELERATE_USE_FSDP", "FSDP"),
    ("ACCELERATE_USE_DEEPSPEED", "DeepSpeed"),
)
"""The variables ``accelerate launch`` sets for a sharded run, and the engine each names."""


def refuse_sharded_launch() -> None:
    """Refuse FSDP and DeepSpeed launches before any model loads: heal shards nothing yet.

    Every process holds the whole student and teacher (data-parallel), and the adapters are read and merged
    as whole tensors; under a sharding engine that would fail deep in a step, or not fit at all. FSDP under
    accelerate runs only on GPUs, so that path could not be built and tested on a CPU.
    """
    for variable, engine in SHARDING_ENGINES:
        if os.environ.get(variable, "false").lower() == "true":
            raise InvalidOptionError(
                f"heal trains data-parallel only (every process holds both models whole), and this launch asks "
                f"for {engine} sharding, which heal does not do yet: launch without it (accelerate config "
                "distributed_type MULTI_GPU), or, for a model too large for one device, heal on one device with "
                "--teacher-cache disk"
            )


def make_accelerator(execution: ExecutionOptions) -> Any:
    """The run's ``Accelerator``: one process here, or the processes of ``accelerate launch``."""
    from accelerate import Accelerator

    from swm_hub.core.devices import resolve_device

    return Accelerator(cpu=resolve_device(execution.device) == "cpu")


def _per_step_blocks(options: HealOptions, accelerator: Any) -> int:
    world = int(accelerator.num_processes)
    if options.batch_size % world:
        raise InvalidOptionError(
            f"--batch-size {options.batch_size} does not split over {world} processes: use a multiple of {world}"
        )
    return options.batch_size


def training_calibration(plan: MergePlan, options: HealOptions, samples: int) -> CalibrationOptions:
    """The text to train on: ``options.calib``, or the text the plan was calibrated on (never the held-out text)."""
    if options.calib is not None:
        return CalibrationOptions(
            text=options.calib, samples=samples, seq_len=options.seq_len, batch_size=samples
        )
    recorded = CalibrationOptions.recorded(plan.calibration, batch_size=samples)
    return replace(recorded, samples=samples, seq_len=options.seq_len)


def training_blocks(tokenizer: Any, plan: MergePlan, options: HealOptions) -> tuple[torch.Tensor, str]:
    """Distinct blocks for the budget: as many as it uses, or as many as the text holds (then reused by epoch).

    The text's size is found by asking for blocks: the largest count it can give, by bisection.
    """
    wanted = options.steps * options.batch_size

    def blocks_of(count: int) -> torch.Tensor | None:
        try:
            return torch.cat(calibration_batches(tokenizer, training_calibration(plan, options, count)))
        except CalibrationDataError:
            return None

    found = blocks_of(wanted)
    if found is None:
        low, high, found = 0, wanted, None
        while high - low > 1:
            middle = (low + high) // 2
            attempt = blocks_of(middle)
            if attempt is None:
                high = middle
            else:
                low, found = middle, attempt
        if found is None:  # not even one block: let the text's own error say why
            calibration_batches(tokenizer, training_calibration(plan, options, 1))
            raise CalibrationDataError("the training text gives no block")  # pragma: no cover
    return found, _text_label(plan, options)


def _text_label(plan: MergePlan, options: HealOptions) -> str:
    return str(options.calib.resolve()) if options.calib is not None else str(plan.calibration["text"])


def _teacher_source(
    teacher: nn.Module | Teacher,
    student: PreTrainedModel,
    plan: MergePlan,
    blocks: torch.Tensor,
    hidden_layers: tuple[int, ...],
    options: HealOptions,
    accelerator: Any,
    store_folder: Path | None,
    progress: bool,
) -> tuple[str, Teacher]:
    """The teacher as the run uses it: in memory, or through a disk cache built from it now (or found ready)."""
    if not isinstance(teacher, nn.Module):
        return "disk", teacher
    mode = "memory" if options.teacher_cache == "auto" else options.teacher_cache
    if mode == "memory":
        return mode, MemoryTeacher(teacher.to(accelerator.device), hidden_layers)
    layout = cache_layout(student, blocks, hidden_layers, options)
    with _cache_folder(store_folder) as folder:
        return "disk", build_cache(teacher, blocks, layout, folder, accelerator, options.batch_size, progress)


@contextmanager
def _cache_folder(store_folder: Path | None) -> Iterator[Path]:
    """The cache lives in the checkpoint folder, or in a temporary folder when a run keeps no checkpoints."""
    if store_folder is not None:
        yield store_folder / CACHE_FOLDER
        return
    with tempfile.TemporaryDirectory(prefix="swm-hub-heal-cache-") as temp:
        yield Path(temp)


def cache_layout(
    student: nn.Module, blocks: torch.Tensor, hidden_layers: tuple[int, ...], options: HealOptions
) -> CacheLayout:
    config: Any = getattr(student, "config")  # noqa: B009
    text_config = config.get_text_config()
    return CacheLayout(
        blocks=int(blocks.shape[0]),
        seq_len=int(blocks.shape[1]),
        top_k=min(options.top_k, int(text_config.vocab_size)),
        hidden_layers=hidden_layers,
        hidden_size=int(text_config.hidden_size),
        fingerprint=block_fingerprint(blocks),
    )


def autocast_dtype(options: HealOptions, device: torch.device) -> torch.dtype | None:
    """bfloat16 when asked, or under ``auto`` when the weights are float32 and the device computes in bfloat16.

    On SmolLM2-135M at 9 of 30 removed, a heal under bfloat16 autocast ran 1.5x faster on this project's
    AMX CPU and healed to the same held-out perplexity as float32 (51.63 against 51.73): a fixed time buys
    half as many tokens again, and tokens are what healing needs (README, heal).
    """
    if options.autocast == "off" or options.execution.dtype != "float32":
        return None
    if options.autocast == "bf16" or has_bf16_arithmetic(device):
        return torch.bfloat16
    return None


# --- loading and writing ----------------------------------------------------------------------------------------


def _require_peft() -> None:
    try:
        import peft  # noqa: F401
    except ImportError as error:
        raise MissingDependencyError("peft", PEFT_INSTALL) from error


def _load_models(
    folder: Path,
    plan: MergePlan,
    options: HealOptions,
    store_folder: Path,
    resume: bool,
    progress: bool,
    teacher_in_memory: bool,
) -> tuple[LoadedModel, LoadedModel | Teacher]:
    """The student and the teacher, in the order that keeps the fewest bytes in memory at once.

    With the disk cache the teacher runs (or its finished cache is found) before the student is loaded,
    and is freed before the student comes in; otherwise both are loaded.
    """
    dtype = DTYPES[options.execution.dtype]
    accelerator = make_accelerator(options.execution)
    skeleton = build_skeleton(AutoConfig.from_pretrained(folder).to_dict(), dtype)
    estimate = estimate_memory(skeleton, plan.num_layers, dtype, options.batch_size, options.seq_len)
    mode = choose_teacher_cache(options.teacher_cache, estimate, accelerator.device)
    if mode == "memory" or teacher_in_memory:
        student = pull(str(folder), dtype=dtype, device="cpu")
        return student, pull(plan.model, plan.revision, dtype=dtype, device="cpu")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    blocks, _ = training_blocks(tokenizer, plan, options)
    hidden_layers = tuple(high for _, high in window_boundaries(plan)) if options.hidden_weight > 0 else ()
    layout = cache_layout(skeleton, blocks, hidden_layers, options)
    cache_dir = store_folder / CACHE_FOLDER
    if not (resume and complete_cache(cache_dir, layout)):
        CheckpointStore(store_folder, {}).create()
        original = pull(plan.model, plan.revision, dtype=dtype, device="cpu").model
        build_cache(
            original.to(accelerator.device),
            blocks,
            layout,
            cache_dir,
            accelerator,
            options.batch_size,
            progress,
        )
        del original
        gc.collect()
    return pull(str(folder), dtype=dtype, device="cpu"), open_cache(cache_dir, layout)


def _remove_weights(folder: Path) -> None:
    """Unlink the unhealed weights before the healed ones are written under the same names.

    The student was loaded from these files, which may still be mapped into memory: writing over the same
    inode would change tensors under the model's feet, while an unlinked file lives on until unmapped.
    """
    for path in [*folder.glob("model*.safetensors"), *folder.glob("model.safetensors.index.json")]:
        path.unlink()


def write_healed(healed: PreTrainedModel, student: LoadedModel, plan: MergePlan, folder: Path) -> None:
    """Save the healed model (in the precision the compressed one was saved in) with its plan, and check it loads."""
    nn.Module.to(healed, device="cpu", dtype=student.save_dtype)
    for name, tensor in healed.state_dict().items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise InvalidMergeError(
                f"healing made the tensor {name} NaN or infinite: nothing was written; try a lower --lr"
            )
    save_model_folder(healed, student.tokenizer, folder, extra_files={PLAN_FILE: plan.to_json()})
    verify_folder_loads(folder, plan.layers_after)
