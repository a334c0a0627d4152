"""Stage zoo: the default study's tiny checkpoints, trained on a toy world's training split and saved in
Hugging Face format under data/zoo/<name> (conngeo.zoo.train):

- every entry of params `pretrain`: the tiny pretrained models (conngeo.zoo.pretrained);
- every entry of params `zoo.models`: one tiny VLM per real transformers class, each with its family's recipe,
  saved, reloaded from disk and checked on the held-out images (metrics/zoo/<name>.json).

The entries train `zoo.workers` at a time, each in a process of its own with `zoo.threads` torch threads
(`--only NAME` trains one entry in this process: what each worker runs), a VLM as soon as the pretrained
encoder it freezes is saved. A finished entry is kept (data/zoo persists) while its fingerprint is unchanged
(conngeo.zoo.train.fingerprints); an entry removed from params is removed here.
"""

import sys
import time
from pathlib import Path

import typer
from dvclive import Live

from common import PROJECT, dvclive_logger, load_params, run, write_json, write_timings
from conngeo import layout
from conngeo.zoo.train import fingerprints, frozen_encoders, to_train, train_all, train_entry

app = typer.Typer(add_completion=False)


@app.command()
def main(
    train_root: Path = typer.Option(..., help="a toy world's training split (its last zoo.heldout images are held out)"),
    image_size: int = typer.Option(..., help="the toy world's image size (params toyworld.<world>.image_size)"),
    out: Path = typer.Option(Path("data/zoo"), help="checkpoint folders <out>/<name>; a VLM's frozen encoder is <out>/<its pretrain entry>"),
    only: str = typer.Option(None, help="train this one entry here (pretrain or zoo.models), whatever its fingerprint"),
    progress: bool = typer.Option(True, help="a progress bar per training (off in the workers of a parallel run)"),
):
    """Train every tiny checkpoint whose fingerprint changed, zoo.workers at a time."""
    params = load_params()
    pretrain, zoo = params["pretrain"], params["zoo"]
    needs = frozen_encoders(pretrain, zoo["models"])
    prints = fingerprints(pretrain, zoo, needs, train_root, image_size)
    out.mkdir(parents=True, exist_ok=True)
    if only:
        if only not in needs:
            raise SystemExit(f"unknown entry {only!r}; params.yaml pretrain and zoo.models have {sorted(needs)}")
        stage, start = "pretrain" if only in pretrain else "zoo", time.perf_counter()
        with Live(dir=str(layout.live(stage, only)), dvcyaml=False, save_dvc_exp=False) as live:
            report = train_entry(only, pretrain, zoo, train_root, image_size, out, prints[only], progress=progress,
                                 log=dvclive_logger(live, prefix="train/"), say=lambda s: typer.echo(f"zoo: {only} ({s})"))
        write_json(layout.details("zoo", only), report)
        write_timings(stage, only, train=time.perf_counter() - start)
        check = {k: v for k, v in report.items() if k == "accuracy" or k.startswith("heldout_")}
        typer.echo(f"zoo: {only} trained in {time.perf_counter() - start:.0f} s; held-out {check}")
        return
    kept, todo = to_train(out, needs, prints, zoo["models"])
    typer.echo(f"zoo: {len(needs)} checkpoints in {out}: {len(kept)} kept, {len(todo)} to train, "
               f"{zoo['workers']} at a time with {zoo['threads']} torch thread(s) each")
    # the bars of parallel trainings would mix; an option, not TQDM_DISABLE, which tqdm reads when imported: a
    # changed environment would start a second scripts/warm.py server, importing torch and transformers again
    script = [sys.executable, str(PROJECT / "scripts" / "warm.py"), sys.argv[0], "--train-root", str(train_root),
              "--image-size", str(image_size), "--out", str(out), *(["--no-progress"] if zoo["workers"] > 1 else [])]
    if todo:
        start = time.perf_counter()
        train_all(todo, needs, zoo["workers"], script)
        write_timings("zoo", "all", total=time.perf_counter() - start)


if __name__ == "__main__":
    run(app)
