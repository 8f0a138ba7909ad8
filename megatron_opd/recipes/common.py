"""What the recipes (``megatron-opd demo``, ``megatron-opd variants``) share: the model shape and the
embedded CPU recipe, writing the initial model and the training data, launching one ``torchrun`` of
``megatron-opd train``, preparing the teacher and student, and evaluating an HF checkpoint.

The recipe modules import this one and never each other.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(kw_only=True)
class ModelShape:
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    max_positions: int = 1024


ASSETS_DIR = Path(__file__).resolve().parent / "assets"
"""Shipped teacher/student checkpoints (package data), one folder per task: ``assets/<task>/``."""
ASSET_RECORD = "recipe.json"
TASKS = {"chain": ("chain", "chain_val"), "toy": ("toy", None)}
"""Task -> (test benchmark, validation benchmark) of the eval harness."""
STEP_DELIMITERS = {"chain": "\n", "toy": ";"}
"""Task -> the text that ends each solution step (the spans gate's ``--gate-span-delimiter``): chain
steps are lines; toy solutions have no newlines, ``;`` ends each step."""


@dataclass(kw_only=True)
class DemoRecipe:
    """The embedded default. One SFT run trains the teacher; its early snapshot (at
    ``student_snapshot_step``) is the weaker student: same architecture and tokenizer, less training,
    so one SFT phase pays for both models. Both ship in ``assets/<task>/`` (``megatron-opd demo
    --from-scratch`` retrains them), so the default demo spends its time on OPD."""

    task: str = "chain"
    model: ModelShape = field(default_factory=lambda: ModelShape(layers=2, hidden=128, heads=4, kv_heads=2,
                                                                  head_dim=32, intermediate=384))
    sft: dict = field(default_factory=lambda: {
        "--train-iters": 800, "--prompts-per-rollout": 16, "--lr": 4e-3, "--min-lr": 4e-4,
        "--lr-warmup-iters": 10, "--lr-decay-style": "cosine", "--adam-beta2": 0.95, "--no-chat-template": True})
    sft_nproc: int = 1
    teacher_snapshot_step: int | None = None
    """The teacher is this step's snapshot of the SFT run (None: its end); the run stops there. The
    learning-rate schedule spans all ``--train-iters``, so the snapshot does not depend on the stop."""
    student_snapshot_step: int = 330
    opd: dict = field(default_factory=lambda: {
        "--objective": "lsm", "--topk": 16, "--gate": "block", "--gate-block-size": 64,
        "--train-iters": 64, "--prompts-per-rollout": 16, "--samples-per-prompt": 4,
        "--epochs-per-rollout": 2, "--minibatches-per-rollout": 2, "--lr": 1e-3, "--lr-warmup-iters": 4,
        "--adam-beta2": 0.95, "--temperature": 1.0, "--top-p": 1.0, "--max-new-tokens": 320,
        "--micro-batch-size": 32, "--no-chat-template": True})
    eval_problems: int = 64
    """Test problems per model in the demo (x ``eval_n`` samples): 4 models must fit the 10-minute budget."""
    eval_n: int = 8
    train_problems: int = 8000
    nproc: int = 2
    seed: int = 1234
    assets: Path | None = ASSETS_DIR / "chain"

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"recipe task must be one of {sorted(TASKS)}, got {self.task!r}")

    @property
    def sft_steps(self) -> int:
        """SFT steps the teacher gets (the run stops after them)."""
        return self.teacher_snapshot_step or int(self.sft["--train-iters"])

    @property
    def test_benchmark(self) -> str:
        return TASKS[self.task][0]

    @property
    def val_benchmark(self) -> str | None:
        return TASKS[self.task][1]

    @property
    def span_delimiter(self) -> str:
        return STEP_DELIMITERS[self.task]

    def fingerprint(self) -> str:
        """Cache key of the SFT teacher + snapshot: only what determines them."""
        blob = json.dumps([self.task, dataclasses.asdict(self.model), self.sft, self.student_snapshot_step,
                           self.teacher_snapshot_step, self.train_problems, self.seed, self.sft_nproc],
                          sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


def quick_recipe() -> DemoRecipe:
    """A much smaller run for the test suite on the short toy task (it checks the pipeline, not the
    quality): SFT from scratch at TP=2, no shipped checkpoints."""
    return DemoRecipe(
        task="toy", assets=None, sft_nproc=2, teacher_snapshot_step=None,
        model=ModelShape(layers=2, hidden=64, heads=4, kv_heads=2, head_dim=16, intermediate=128),
        sft={"--train-iters": 30, "--prompts-per-rollout": 32, "--lr": 3e-3, "--lr-warmup-iters": 3},
        student_snapshot_step=6,
        opd={"--objective": "lsm", "--topk": 8, "--gate": "block", "--gate-block-size": 64, "--train-iters": 4,
             "--prompts-per-rollout": 8, "--samples-per-prompt": 2, "--epochs-per-rollout": 2,
             "--minibatches-per-rollout": 1, "--lr": 1e-3, "--max-new-tokens": 48, "--micro-batch-size": 16},
        eval_problems=12, eval_n=4, train_problems=500)


def write_toy_data(workdir: Path, recipe: DemoRecipe) -> Path:
    """Training problems of ``recipe.task`` as JSONL (the held-out problems are the eval harness's
    benchmarks of the task, disjoint from every train split by construction)."""
    if recipe.task == "chain":
        from megatron_opd.data.chain_task import generate_chain_problems as generate
    else:
        from megatron_opd.data.toy_task import generate_toy_problems as generate

    train = generate(recipe.train_problems, seed=recipe.seed, split="train")
    path = workdir / f"{recipe.task}_train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in train))
    return path


write_task_data = write_toy_data
"""The name says what it does for every task; ``write_toy_data`` stays for existing callers."""


def write_initial_model(out_dir: Path, shape: ModelShape, seed: int) -> Path:
    """An HF dir with the toy tokenizer, a Qwen3 config and randomly initialised safetensors."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from megatron_opd.data.toy_task import build_toy_tokenizer

    if (out_dir / "config.json").exists():
        return out_dir
    tokenizer = build_toy_tokenizer()
    config = Qwen3Config(vocab_size=len(tokenizer), hidden_size=shape.hidden, intermediate_size=shape.intermediate,
                         num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
                         num_key_value_heads=shape.kv_heads, head_dim=shape.head_dim, max_position_embeddings=shape.max_positions,
                         tie_word_embeddings=True, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=None)
    torch.manual_seed(seed)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    Qwen3ForCausalLM(config).save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    os.replace(tmp, out_dir)
    return out_dir


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def flags_to_argv(flags: dict) -> list[str]:
    """{"--flag": value} -> argv; True gives a bare flag, False/None leave it out."""
    argv = []
    for key, value in flags.items():
        if value is True:
            argv.append(key)
        elif value is not False and value is not None:
            argv += [key, str(value)]
    return argv


def train_command(flags: dict, nproc: int, run_dir: Path, port: int = 29500) -> list[str]:
    """The torchrun argv of one ``megatron-opd train`` phase (what ``run_train`` runs, and prints)."""
    flags = {**flags, "--run-dir": str(run_dir), "--no-progress": True}
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-addr",
            "127.0.0.1", "--master-port", str(port), "-m", "megatron_opd.cli", "train", *flags_to_argv(flags)]


def run_train(flags: dict, nproc: int, run_dir: Path, bar=None, *, stop_after_s: float | None = None,
              stop_when=None) -> float:
    """torchrun ``megatron-opd train`` with ``flags``; returns wall seconds. Raises on failure.

    The trainer's own output goes to ``run_dir/train.log``; ``bar`` advances with the steps it
    writes to ``metrics.jsonl`` (one line per optimizer step, plus one per rollout).
    ``stop_after_s``: stop the run (SIGTERM) after that many wall seconds; ``stop_when``: a callable,
    stop once it returns True (polled every second). Neither is a failure.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    cmd = train_command(flags, nproc, run_dir, port=free_port())
    # Share the cores between the ranks (each rank's torch would otherwise use all of them).
    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 1) // nproc)))
    log_file, metrics_file = run_dir / "train.log", run_dir / "metrics.jsonl"
    metrics_file.unlink(missing_ok=True)
    start, done = time.time(), 0
    with log_file.open("w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        stopped = False
        while proc.poll() is None:
            time.sleep(1.0)
            done = _advance(bar, metrics_file, done)
            overdue = stop_after_s is not None and time.time() - start >= stop_after_s
            if not stopped and (overdue or (stop_when is not None and stop_when())):
                proc.terminate()  # torchrun forwards it to the ranks
                stopped = True
    _advance(bar, metrics_file, done)
    if proc.returncode != 0 and not stopped:
        raise RuntimeError(f"training phase failed (exit {proc.returncode}); log {log_file}:\n"
                           f"{log_file.read_text()[-3000:]}")
    return time.time() - start


def _advance(bar, metrics_file: Path, done: int) -> int:
    if bar is None or not metrics_file.exists():
        return done
    steps = {json.loads(line)["step"] for line in metrics_file.read_text().splitlines() if line.strip()}
    current = max(steps, default=0)
    bar.update(max(current - done, 0))
    return max(current, done)


def sft_flags(recipe: DemoRecipe, data_path: Path, init: Path, teacher_dir: Path) -> dict:
    """The trainer flags of the SFT run that makes the teacher (and the student snapshot)."""
    return {"--data-path": str(data_path), "--seed": recipe.seed, "--tensor-model-parallel-size": recipe.sft_nproc,
            "--log-interval": 25, "--objective": "sft", "--gate": "none", "--epochs-per-rollout": 1,
            "--minibatches-per-rollout": 1, "--micro-batch-size": recipe.sft["--prompts-per-rollout"],
            **recipe.sft, "--student-hf": str(init), "--save-hf": str(teacher_dir),
            "--export-hf-at": ",".join(str(s) for s in (recipe.student_snapshot_step, recipe.teacher_snapshot_step)
                                       if s is not None)}


def shipped_models(recipe: DemoRecipe) -> tuple[Path, Path] | None:
    """(teacher, student) shipped in ``recipe.assets`` when they were made by this very recipe."""
    if recipe.assets is None or not (recipe.assets / ASSET_RECORD).exists():
        return None
    record = json.loads((recipe.assets / ASSET_RECORD).read_text())
    teacher, student = recipe.assets / "teacher", recipe.assets / "student"
    if record.get("fingerprint") != recipe.fingerprint() or not (teacher / "config.json").exists():
        return None
    return teacher, student


def ready_models(recipe: DemoRecipe, cache_dir: Path, *, from_scratch: bool = False) -> tuple[Path, Path, str] | None:
    """(teacher dir, student dir, where they come from) when no SFT has to run: the shipped
    checkpoints when they match the recipe, else the ones cached by an earlier run of it."""
    if from_scratch:
        return None
    shipped = shipped_models(recipe)
    if shipped is not None:
        return shipped[0], shipped[1], "shipped"
    key = recipe.fingerprint()
    teacher_dir, student_dir = cache_dir / f"teacher-{key}", cache_dir / f"student-{key}"
    if (teacher_dir / "config.json").exists() and (student_dir / "config.json").exists():
        return teacher_dir, student_dir, "cached"
    return None


def prepare_models(recipe: DemoRecipe, workdir: Path, cache_dir: Path, bar=None, *,
                   from_scratch: bool = False) -> tuple[Path, Path, Path]:
    """(teacher dir, student dir, training data). The shipped checkpoints when they match the recipe
    (unless ``from_scratch``), else one SFT run from random init, cached by recipe; ``bar`` advances
    with the SFT steps only when they run."""
    workdir.mkdir(parents=True, exist_ok=True)
    data_path = write_toy_data(workdir, recipe)
    steps = recipe.sft_steps
    say = bar.write if bar is not None else print
    ready = ready_models(recipe, cache_dir, from_scratch=from_scratch)
    if ready is not None:
        teacher_dir, student_dir, source = ready
        note = f" (see {recipe.assets / 'README.md'})" if source == "shipped" else ""
        say(f"sft: {source} teacher {teacher_dir} and student {student_dir}{note}")
        return teacher_dir, student_dir, data_path
    cache_dir.mkdir(parents=True, exist_ok=True)
    key = recipe.fingerprint()
    teacher_dir, student_dir = cache_dir / f"teacher-{key}", cache_dir / f"student-{key}"
    if not from_scratch and (teacher_dir / "config.json").exists() and (student_dir / "config.json").exists():
        if bar is not None:
            bar.update(steps)
        say(f"sft: cached teacher {teacher_dir} and student {student_dir}")
        return teacher_dir, student_dir, data_path
    init_dir = cache_dir / f"init-{key}"
    shutil.rmtree(init_dir, ignore_errors=True)  # from random init, always the same one
    init = write_initial_model(init_dir, recipe.model, recipe.seed)
    run_dir = workdir / "run_sft"
    flags = sft_flags(recipe, data_path, init, teacher_dir)
    say(f"sft: seed {recipe.seed}; command: {shlex.join(train_command(flags, recipe.sft_nproc, run_dir))}")
    teacher_step = recipe.teacher_snapshot_step
    stop_when = None if teacher_step is None else (run_dir / f"hf_step{teacher_step}").exists
    seconds = run_train(flags, recipe.sft_nproc, run_dir, bar, stop_when=stop_when)
    # The snapshots land in the run dir; publish them into the cache with one rename each.
    shutil.rmtree(student_dir, ignore_errors=True)
    os.replace(run_dir / f"hf_step{recipe.student_snapshot_step}", student_dir)
    if teacher_step is not None:
        shutil.rmtree(teacher_dir, ignore_errors=True)
        os.replace(run_dir / f"hf_step{teacher_step}", teacher_dir)
    (workdir / "sft_seconds.txt").write_text(f"{seconds:.1f}\n")
    say(f"sft: teacher ({steps} steps) and student (step {recipe.student_snapshot_step}) trained in {seconds:.0f} s")
    return teacher_dir, student_dir, data_path


def phase_times(run_dir: Path) -> dict:
    """Total seconds per phase of the OPD run, from its metrics.jsonl."""
    totals: dict[str, float] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        for key, value in json.loads(line).items():
            if key.startswith("time_") and key != "time_iteration":
                totals[key[5:]] = totals.get(key[5:], 0.0) + value
    return totals


def evaluate_hf_dir(model_dir: Path, out_dir: Path, *, benchmarks, n: int, seed: int, limit, max_new_tokens: int,
                    data_dir, pool, batch_problems: int = 16, chat_template: bool | None = None) -> dict:
    """Evaluate an HF checkpoint with the in-process engine (temperature 1, full support).

    ``batch_problems`` problems (x ``n`` samples) share one generation batch: larger batches spread
    the sampler's per-step overhead over more rows; results do not depend on it.
    ``chat_template``: default off for the benchmarks trained on raw prompts (``chain``), else on."""
    from transformers import AutoTokenizer

    from megatron_opd.eval.benchmarks import default_chat_template
    from megatron_opd.eval.harness import evaluate
    from megatron_opd.rollout import LocalRolloutEngine

    if chat_template is None:
        chat_template = default_chat_template(benchmarks)

    shutil.rmtree(out_dir, ignore_errors=True)  # never resume generations of an older model
    engine = LocalRolloutEngine(str(model_dir), seed=seed)
    return evaluate(engine, AutoTokenizer.from_pretrained(model_dir), benchmarks=benchmarks, n=n, ks=(1, n),
                    out_dir=str(out_dir), pool=pool, limit=limit, temperature=1.0, top_p=1.0,
                    max_new_tokens=max_new_tokens, seed=seed, data_dir=data_dir, show_progress=False,
                    batch_problems=batch_problems, chat_template=chat_template)
