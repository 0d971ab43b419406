"""The `llmft` command line: one subcommand per stage, each reading one YAML config."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from llmft import __version__
from llmft.annotate.commands import app as annotate_app
from llmft.errors import LlmftError

app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode="rich",
                  help="LLM post-training with LoRA: [bold]sft → reward → ppo[/], [bold]sft → dpo[/], or "
                       "[bold]sft → grpo[/], [bold]sft → kto[/].")
err = Console(stderr=True)

CONFIG = typer.Argument(..., help="The stage's YAML config (see configs/).", show_default=False)
SET = typer.Option([], "--set", help="Override a config key, e.g. --set train.learning_rate=1e-4 "
                                     "(repeatable; the value is read as YAML).")
DRY_RUN = typer.Option(False, "--dry-run", help="Validate, resolve model and data, print the resolved "
                                                "config and the plan, and exit without training.")


def version_callback(value: bool) -> None:
    if value:
        print(f"llmft {__version__}")
        raise typer.Exit()


@app.callback()
def root(version: bool = typer.Option(False, "--version", callback=version_callback, is_eager=True,
                                      help="Print the version and exit.")) -> None:
    """llmft: SFT, reward modelling, DPO and PPO for causal LMs, one YAML config per stage."""


@app.command()
def sft(config: Path = CONFIG, set_: list[str] = SET, dry_run: bool = DRY_RUN) -> None:
    """Supervised fine-tuning of a LoRA adapter on prompt/completion, chat or text data."""
    from llmft.config import load_config
    from llmft.stages import sft as stage

    stage.run(load_config("sft", config, set_), dry_run=dry_run)


@app.command()
def reward(config: Path = CONFIG, set_: list[str] = SET, dry_run: bool = DRY_RUN) -> None:
    """Train a reward model (LoRA + scalar head) on preference pairs or ranked answers."""
    from llmft.config import load_config
    from llmft.stages import reward as stage

    stage.run(load_config("reward", config, set_), dry_run=dry_run)


@app.command()
def dpo(config: Path = CONFIG, set_: list[str] = SET, dry_run: bool = DRY_RUN) -> None:
    """Direct preference optimisation (DPO, cDPO, robust, hinge, IPO, SimPO, ORPO) of a LoRA adapter."""
    from llmft.config import load_config
    from llmft.stages import dpo as stage

    stage.run(load_config("dpo", config, set_), dry_run=dry_run)


@app.command()
def kto(config: Path = CONFIG, set_: list[str] = SET, dry_run: bool = DRY_RUN) -> None:
    """Kahneman-Tversky optimisation of a LoRA adapter on answers labelled desirable or undesirable (unpaired)."""
    from llmft.config import load_config
    from llmft.stages import kto as stage

    stage.run(load_config("kto", config, set_), dry_run=dry_run)


@app.command()
def ppo(config: Path = CONFIG, set_: list[str] = SET, dry_run: bool = DRY_RUN) -> None:
    """RLHF with PPO: policy, value, reward and reference on one base model (LoRA adapters)."""
    from llmft.config import load_config
    from llmft.stages import ppo as stage

    stage.run(load_config("ppo", config, set_), dry_run=dry_run)


@app.command()
def grpo(config: Path = CONFIG, set_: list[str] = SET, dry_run: bool = DRY_RUN) -> None:
    """Critic-free RL: GRPO, Dr. GRPO, DAPO, GSPO or RLOO, G answers per prompt scored by judges or a reward model."""
    from llmft.config import load_config
    from llmft.stages import grpo as stage

    stage.run(load_config("grpo", config, set_), dry_run=dry_run)


@app.command()
def loop(config: Path = CONFIG, set_: list[str] = SET) -> None:
    """Rounds of on-policy feedback: the policy answers, programs or people judge (scores, critiques), the answers
    become pairs or refinements, a dpo (or sft) stage trains the next policy; a report per round."""
    from llmft.config import load_config
    from llmft.loop import rounds
    from llmft.loop.config import LoopConfig

    rounds.run(load_config("loop", config, set_, schema=LoopConfig))


@app.command()
def generate(
    model: str = typer.Argument(..., help="Model source: alias, directory, .gguf, hub id or a stage's output_dir."),
    prompts: Path = typer.Option(..., "--prompts", help="JSONL/JSON/CSV/Parquet rows with 'prompt' (or 'messages')."),
    out: Path | None = typer.Option(None, "--out", help="Write JSONL here (default: standard output)."),
    max_new_tokens: int = typer.Option(128, help="Longest answer, in new tokens."),
    temperature: float = typer.Option(0.7, help="Sampling temperature; 0 = greedy."),
    top_p: float = typer.Option(1.0, help="Nucleus sampling mass."),
    top_k: int = typer.Option(0, help="Top-k sampling; 0 = off."),
    seed: int = typer.Option(0, help="Sampling seed."),
    draw: str = typer.Option("inverse_cdf", help="inverse_cdf (llmft's draw) or multinomial (as transformers "
                                                 "samples)."),
    batch_size: int = typer.Option(16, help="Prompts per generation batch."),
    engine: str = typer.Option("hf", help="hf (transformers, in this process) or vllm (vLLM in a process of its "
                                          "own: docs/rollout.md)."),
    limit: int | None = typer.Option(None, help="Only the first N prompts."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    dtype: str = typer.Option("auto", help="auto, float32, bfloat16 or float16."),
    kernels: bool = typer.Option(False, "--kernels", help="Let transformers use Hub kernels (remote code; off by "
                                                          "default)."),
) -> None:
    """Answer every row of a prompts file (chat template applied); each row comes back with its answer in
    [bold]response[/], [bold]finished[/] (ended with a stop id) and [bold]response_tokens[/]."""
    from llmft.commands.generate import run_generate
    from llmft.config import GenerateConfig
    from llmft.schema import build

    sampling = {"max_new_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p, "top_k": top_k,
                "seed": seed, "batch_size": batch_size, "draw": draw, "engine": engine}
    raw = {"model": model, "prompts": str(prompts), "out": str(out) if out else None, "limit": limit,
           "sampling": sampling, "device": device, "dtype": dtype, "kernels": kernels}
    run_generate(build(GenerateConfig, raw, "llmft generate"))


@app.command(name="eval")
def evaluate(
    config: Path | None = typer.Argument(None, help="An eval YAML config (see configs/eval.yaml); or use flags.",
                                         show_default=False),
    model: list[str] = typer.Option([], "--model", help="A policy to evaluate (repeatable; first = baseline)."),
    compare: list[str] = typer.Option([], "--compare", help="More policies to evaluate side by side (repeatable)."),
    prompts: str | None = typer.Option(None, "--prompts", help="Held-out prompts file."),
    reference: str | None = typer.Option(None, "--reference", help="Model to measure the KL against."),
    reward_model: str | None = typer.Option(None, "--reward-model", help="A reward model (llmft reward output) "
                                                                         "that scores every answer."),
    preferences: str | None = typer.Option(None, "--preferences", help="Preference pairs: report the reward "
                                                                       "model's pairwise accuracy on them."),
    out: str | None = typer.Option(None, "--out", help="Write the JSON report here."),
    engine: str | None = typer.Option(None, "--engine", help="hf or vllm (sampling.engine): what generates."),
    set_: list[str] = SET,
) -> None:
    """Generate on held-out prompts and report judge pass rate and score, reward-model score, KL to a reference,
    length, share ended with EOS, and win rates against the first model, side by side; and a reward model's
    pairwise accuracy on preference pairs."""
    from llmft.commands import evaluation
    from llmft.config import load_config
    from llmft.schema import read_yaml

    models = model or (read_yaml(config).get("models", []) if config else [])  # --compare adds to these
    flags = {"models": [*models, *compare] or None, "prompts": prompts, "reference": reference,
             "reward_model": reward_model, "preferences": preferences, "out": out}
    base = {k: v for k, v in flags.items() if v is not None}
    if engine:
        set_ = [*set_, f"sampling.engine={engine}"]
    evaluation.run(load_config("eval", config, set_, base=base))


@app.command()
def export(
    run: str = typer.Argument(..., help="A finished run's output_dir (sft, dpo, ppo, grpo or reward).",
                              show_default=False),
    out: str = typer.Option(..., "--out", help="The folder to write (new, or an earlier export with --overwrite)."),
    format_: str = typer.Option("hf", "--format", help="hf: a transformers model directory; gguf: one GGUF file "
                                                       "for llama.cpp / Ollama (llama and qwen2 models)."),
    dtype: str = typer.Option("auto", help="hf weights: auto (the base model's), float32, bfloat16 or float16."),
    quant: str | None = typer.Option(None, help="gguf matrices: f16 (the default) or q8_0."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an earlier export in --out."),
) -> None:
    """Merge a run's whole adapter chain (base → sft → dpo ...) into one model that loads without llmft or peft:
    [bold]AutoModelForCausalLM[/] (or a GGUF file) for a policy, [bold]AutoModelForSequenceClassification[/] for a
    reward model."""
    import json

    from llmft.export.hf import RECORD, run_export

    target = run_export(run, out, format_, dtype, quant, overwrite)
    record = json.loads((target / RECORD).read_text())
    what = record.get("file", "") or record["class"]
    print(f"wrote {target} ({what}, {record.get('quantization') or record.get('dtype')}; "
          f"{len(record['lineage']) - 1} run(s) merged onto {record['lineage'][-1]['base_model']})")
    if record.get("score_offset"):
        err.print(f"[yellow]note:[/] the reward head's bias {record['score_offset']:.4g} has no place in "
                  f"transformers' score layer: exported scores are lower by it (pairwise comparisons unchanged)")


app.add_typer(annotate_app, name="annotate")


@app.command()
def plot(
    runs: list[Path] = typer.Argument(..., help="Run directories (output_dir of any stage).", show_default=False),
    out: Path | None = typer.Option(None, "--out", help="PNG to write (default: FIRST_RUN/curves.png)."),
) -> None:
    """Draw the training curves of one or more runs (loss, eval loss and each stage's key figures) into a PNG."""
    from llmft.commands.plot import plot as draw

    target = out or runs[0] / "curves.png"
    panels = draw(runs, target)
    print(f"wrote {target} ({', '.join(panels)})")


@app.command()
def env() -> None:
    """Print the versions, devices and distributed settings a bug report needs (paste it into the issue)."""
    from llmft.commands.env import report

    for key, value in report():
        print(f"- {key}: {value}")


@app.command()
def schema(stage: str = typer.Argument("sft", help="Stage whose config keys to list.")) -> None:
    """List every config key of a stage with its type, range, default and meaning."""
    from rich.markup import escape

    from llmft.config import STAGE_CONFIGS
    from llmft.loop.config import LoopConfig
    from llmft.schema import schema_rows

    configs = STAGE_CONFIGS | {"loop": LoopConfig}
    if stage not in configs:
        raise LlmftError(f"unknown stage '{stage}' (stages with configs: {', '.join(configs)})")
    t = Table(title=f"llmft {stage} config")
    t.add_column("key", no_wrap=True, style="bold")
    for col in ("type", "default", "meaning"):
        t.add_column(col, overflow="fold")
    for row in schema_rows(configs[stage]):
        t.add_row(*map(escape, row))  # help text is plain: [tensorboard] is not markup
    Console().print(t)


def quiet_libraries() -> None:
    """Keep the libraries' own progress bars and advisory warnings off the user's terminal."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import warnings

    if "transformers" in sys.modules:  # already imported (e.g. by a caller): its env settings are read
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()

    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)


def main() -> None:
    quiet_libraries()
    try:
        app(standalone_mode=False, prog_name="llmft")
    except LlmftError as e:
        if os.environ.get("RANK", "0") == "0":  # under a launcher every process meets the same error: say it once
            say_error(str(e))
        else:  # and the others leave after rank 0: a launcher stops every process when the first one exits
            time.sleep(10)
        sys.exit(2)
    except KeyboardInterrupt:
        err.print("[yellow]interrupted[/]: rerun with resume: auto to continue from the last checkpoint")
        sys.exit(130)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except typer.Abort:
        sys.exit(1)
    except Exception as e:
        if not is_usage_error(e):
            raise
        if type(e).__name__ == "NoArgsIsHelpError":  # `llmft` or `llmft sft` alone: the help, not an error
            print(e.format_message())
            sys.exit(0)
        say_error(usage_message(e))
        sys.exit(2)


def say_error(message: str) -> None:
    err.print(f"[bold red]error:[/] {escape(' '.join(message.split()))}", highlight=False, soft_wrap=True)


def is_usage_error(e: Exception) -> bool:
    """A command-line usage error from click, or from the copy of click that typer ≥ 0.20 carries (typer._click),
    whose exceptions are not click's."""
    try:
        import click

        if isinstance(e, click.ClickException):
            return True
    except ImportError:
        pass
    return type(e).__module__.split(".")[0] in ("typer", "click") and hasattr(e, "format_message")


def usage_message(e: Exception) -> str:
    ctx = getattr(e, "ctx", None)
    hint = f" (see {ctx.command_path} --help)" if ctx is not None else ""
    return e.format_message() + hint
