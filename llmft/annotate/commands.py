"""The `llmft annotate` subcommands."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

app = typer.Typer(no_args_is_help=True, add_completion=False, rich_markup_mode="rich",
                  help="People's feedback: build candidates, judge them in a local page, export training files.")
console = Console()

ANNOTATIONS = typer.Option(None, "--annotations", help="The annotations JSONL (default: next to the candidates "
                                                       "file, CANDIDATES.annotations.jsonl).")


def annotations_path(candidates: Path, annotations: Path | None) -> Path:
    return annotations or candidates.with_name(candidates.stem + ".annotations.jsonl")


@app.command()
def candidates(
    outputs: list[Path] = typer.Argument(..., help="`llmft generate` outputs over the same prompts file, one per "
                                                   "model or seed.", show_default=False),
    out: Path = typer.Option(..., "--out", help="The candidates JSONL to write."),
) -> None:
    """Turn several [bold]llmft generate[/] outputs into one candidates file: each prompt with every answer to it."""
    from llmft.annotate.items import from_generations

    items = from_generations([str(p) for p in outputs], out)
    k = sum(len(it.candidates) for it in items.items) / max(len(items), 1)
    console.print(f"wrote {out}: {len(items)} items, {k:.1f} distinct answers each "
                  f"(prompts whose answers were all alike are left out)")


@app.command()
def serve(
    candidates: Path = typer.Argument(..., help="The candidates JSONL to judge.", show_default=False),
    annotations: Path | None = ANNOTATIONS,
    annotator: str | None = typer.Option(None, help="Default annotator name shown in the page (each person can "
                                                    "type their own)."),
    mode: str = typer.Option("feedback", help="feedback: rate, rank, pick, edit, tie, skip; compare: two answers "
                                              "side by side, blind, pick one or tie."),
    host: str = typer.Option("127.0.0.1", help="Address to listen on (loopback by default)."),
    port: int = typer.Option(8765, help="Port (0 = any free one)."),
    allow_remote: bool = typer.Option(False, "--allow-remote", help="Allow a non-loopback --host; every request "
                                                                    "then needs the token."),
    token: str | None = typer.Option(None, help="The token requests must carry (default on a non-loopback host: "
                                                "a fresh random one)."),
) -> None:
    """Serve the annotation page; every judgement is appended to the annotations file as it is made."""
    from llmft.annotate.items import read_items
    from llmft.annotate.server import App, check_binding, is_loopback, make_server
    from llmft.annotate.store import Store

    items = read_items(candidates)
    store = Store(annotations_path(candidates, annotations), items, writable=True)
    token = check_binding(host, allow_remote, token)
    server = make_server(App(items, store, mode, token, annotator, is_loopback(host)), host, port)
    url = f"http://{host if ':' not in host else f'[{host}]'}:{server.server_address[1]}/"
    from urllib.parse import urlencode

    query = urlencode({k: v for k, v in (("token", token), ("annotator", annotator)) if v})
    done = ", ".join(f"{a}: {len(store.finished(a))}" for a in store.annotators()) or "none yet"
    console.print(f"{len(items)} items of {candidates} ({mode}); finished so far: {done}")
    console.print(f"judgements are appended to {store.path}")
    console.print(f"open [bold]{url}{'?' + query if query else ''}[/]   (Ctrl-C stops; nothing saved is lost)",
                  soft_wrap=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        console.print(f"stopped: {len(store.judgements)} judgements in {store.path}")
    finally:
        server.server_close()


@app.command()
def export(
    candidates: Path = typer.Argument(..., help="The candidates JSONL that was judged.", show_default=False),
    to: str = typer.Option(..., "--to", help="dpo or reward (pairs), ranked (reward's listwise rows), kto "
                                             "(labelled answers), sft (chosen and edited answers) or critiques "
                                             "(answers with what people said is wrong with them)."),
    out: Path = typer.Option(..., "--out", help="The JSONL to write."),
    annotations: Path | None = ANNOTATIONS,
    pairs: str = typer.Option("best-worst", help="dpo/reward: best-worst (one pair per item) or all (every "
                                                 "decided pair)."),
    min_gap: float = typer.Option(1.0, help="Ratings decide a pair when their means differ by at least this "
                                            "(the margin)."),
    threshold: float = typer.Option(4.0, help="kto/sft: a mean rating at least this is a good answer."),
    report_out: Path | None = typer.Option(None, "--report", help="Also write the report (agreement, position "
                                                                  "bias, blind win rates) as JSON here."),
) -> None:
    """Write the training file a stage reads from the judgements in force, and report on the people's agreement,
    position bias and blind win rates."""
    from llmft.annotate.export import report, rows_for, verdicts, write_rows

    store = open_store(candidates, annotations)
    rows = rows_for(to, verdicts(store), pairs, min_gap, threshold)
    write_rows(rows, out)
    stage = {"ranked": " for llmft reward", "critiques": " (answers and their critiques)"}.get(to, f" for llmft {to}")
    console.print(f"wrote {out}: {len(rows)} rows{stage}")
    show(report(store, min_gap), report_out)


@app.command(name="report")
def report_command(
    candidates: Path = typer.Argument(..., help="The candidates JSONL that was judged.", show_default=False),
    annotations: Path | None = ANNOTATIONS,
    out: Path | None = typer.Option(None, "--out", help="Write the report as JSON here."),
) -> None:
    """Progress, agreement between people, position bias and blind win rates (with 95% intervals)."""
    from llmft.annotate.export import report

    show(report(open_store(candidates, annotations)), out)


def open_store(candidates: Path, annotations: Path | None):
    from llmft.annotate.items import read_items
    from llmft.annotate.store import Store
    from llmft.errors import DataError

    path = annotations_path(candidates, annotations)
    if not path.exists():
        raise DataError(f"annotations file not found: {path}")
    return Store(path, read_items(candidates))


def show(rep: dict, out: Path | None) -> None:
    import json

    from llmft.checkpoint import atomic_write_text

    done = ", ".join(f"{a} {n}" for a, n in rep["finished_by"].items())
    console.print(f"{rep['judgements']} judgements on {rep['items']} items ({rep['critiques']} critiques in words); "
                  f"finished by: {done or 'nobody'}")
    ag, pb = rep["agreement"], rep["position_bias"]
    if ag["pairwise_agreement"] is not None:
        console.print(f"agreement: {ag['pairwise_agreement']:.1%} of {ag['pairs_compared']} answer pairs judged by "
                      f"two people ({ag['items_judged_by_several']} items judged by several)")
    if ag["mean_rating_gap"] is not None:
        console.print(f"ratings of the same answer by two people differ by {ag['mean_rating_gap']:.2f} on average "
                      f"({ag['ratings_compared']} comparisons)")
    if pb["choices"]:
        console.print(f"position bias: the answer shown first was preferred in {pb['first_shown_preferred']:.1%} of "
                      f"{pb['choices']} choices (chance {pb['chance']:.1%})")
    for key, w in rep["win_rates"].items():
        console.print(f"blind comparison {key}: win rate {w['win_rate']:.1%} (95% CI {w['ci95'][0]:.1%}–"
                      f"{w['ci95'][1]:.1%}; {w['wins']} wins, {w['losses']} losses, {w['ties']} ties)")
    if out:
        atomic_write_text(out, json.dumps(rep, indent=2, ensure_ascii=False) + "\n")
        console.print(f"report written to {out}")


@app.command(name="import")
def import_(
    source: Path = typer.Argument(..., help="A Label Studio JSON / JSON-MIN export, or Argilla rows (JSONL, JSON, "
                                            "Parquet).", show_default=False),
    tool: str = typer.Option(..., "--from", help="label-studio or argilla."),
    candidates: Path = typer.Option(..., "--candidates", help="The candidates JSONL to write."),
    annotations: Path | None = ANNOTATIONS,
    fields: str | None = typer.Option(None, help="PROMPT,ANSWER,ANSWER...: the text fields (default Label Studio: "
                                                 "prompt,answer1,answer2; Argilla: prompt,response1,response2)."),
    ranking: str | None = typer.Option(None, help="Argilla: the ranking question over the answer fields."),
    rating: list[str] = typer.Option([], help="Argilla: QUESTION=FIELD, a 1-5 rating question of one answer "
                                              "(repeatable)."),
    edit: list[str] = typer.Option([], help="Argilla: QUESTION=FIELD, a text question holding an edit of that "
                                            "answer (repeatable)."),
) -> None:
    """Convert feedback from Label Studio (pairwise) or Argilla (rankings, ratings, edits) into a candidates file and
    an annotations file, ready for [bold]llmft annotate export[/]."""
    from llmft.annotate import imports
    from llmft.errors import ConfigError

    names = fields.split(",") if fields else (["prompt", "answer1", "answer2"] if tool == "label-studio"
                                              else ["prompt", "response1", "response2"])
    if len(names) < 3:
        raise ConfigError("--fields names the prompt and at least two answers: PROMPT,ANSWER,ANSWER")
    if tool == "label-studio":
        found = imports.label_studio(str(source), names)
    elif tool == "argilla":
        pairs = {}
        for opt, values in (("--rating", rating), ("--edit", edit)):
            for v in values:
                question, _, field = v.partition("=")
                if field not in names[1:]:
                    raise ConfigError(f"{opt} {v}: expected QUESTION=FIELD with FIELD one of {', '.join(names[1:])}")
                pairs.setdefault(opt, {})[question] = field
        found = imports.argilla(str(source), names[0], names[1:], ranking, pairs.get("--rating", {}),
                                pairs.get("--edit", {}))
    else:
        raise ConfigError(f"--from must be label-studio or argilla, got '{tool}'")
    store = imports.write(found, candidates, annotations_path(candidates, annotations))
    console.print(f"wrote {candidates} ({len(found)} items) and {store.path} ({len(store.judgements)} judgements "
                  f"by {len(store.annotators())} people)")
