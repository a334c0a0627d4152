"""The real study on a few photographs first: every model of the real profile on its real checkpoint through
the stage scripts the real run uses (extract -> captions -> score), timed, and what N photographs would take.

    python scripts/import_coco.py --karpathy data/coco/dataset_coco.json --images data/coco --split test \\
        --limit 20 --instances data/coco/annotations/instances_val2014.json --out data/images/trial
    python scripts/trial.py --images data/images/trial

The stages run in a work folder of their own (--work, default data/trial, emptied first) with a params.yaml
that is the project's with profiles/real.yaml merged over it (--profile, repeatable, as scripts/apply_profile.py
merges), data.root set to --images, captions from E_post only (no reconstructor yet) and no perturbations
(so score scores those captions): nothing of the project's own data, params or dvc.lock is touched. It
prints every caption beside the image's first reference, each stage's time split into a fixed part and a
part per photograph, and projects time and disk for N photographs (--project, default 5,000 and 40,504):

    fixed      the stage's time outside its work on the photographs: Python's start, imports, loading
               the checkpoints (extract and captions record their model's loading in
               logs/timings/<stage>/<model>.json; score's CLIP and RoBERTa are loaded here once more, after
               the stages, and timed, with the start of `python stages/score.py --help`)
    per photo  (stage - fixed) / photographs
    time(N)    fixed + per photo x N
    disk(N)    the trial's data/vectors bytes per photograph x N; data/recon_vectors holds E_pre again

A trial of 20 photographs is one or two batches, the first with the GPU's warm-up, so the per-photo part
errs long. The real run's captions stage generates twice per photograph (from E_post and from the
reconstruction) and perturb once per perturbation set, so those take about (2 + sets) x captions' per-photo
time; references, geometry, recon, recon_export, recon_eval and report are not run here (docs/real-study.md).
"""

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import typer
import yaml

from apply_profile import merge

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("extract", "captions", "score")
MARK = "# written by scripts/trial.py: the params of a trial run (this folder is emptied by the next trial)\n"

app = typer.Typer(add_completion=False)


def absolute(path) -> str | None:
    return None if path is None else str(ROOT / path)  # an absolute path stays as it is


def trial_params(profiles: list[Path], images: Path, models: list[str]) -> tuple[dict, int]:
    """The project's params with the profiles merged over it, for stages that run in another folder; and the
    number of perturbation sets the real run would caption."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for profile in profiles:
        params = merge(params, yaml.safe_load(profile.read_text()) or {})
    unknown = sorted(set(models) - set(params["models"]))
    if unknown:
        raise SystemExit(f"--model {unknown}: not in the profile's models {sorted(params['models'])}")
    params["models"] = {name: {**spec, "source": absolute(spec["source"])} for name, spec in params["models"].items()
                        if not models or name in models}
    score = params["score"]
    score["clip"]["source"] = absolute(score["clip"]["source"])
    score["bertscore_source"] = absolute(score["bertscore_source"])
    params["data"]["root"] = str(images.resolve())
    sets = len(params["perturb"]["modes"]) * len(params["perturb"]["levels"])
    params["perturb"]["modes"] = []  # no perturbation sets: score scores the captions from E_post
    return params, sets


def fresh(work: Path) -> None:
    """Empty `work`, once it is sure to be a trial's folder (or empty)."""
    if work.exists():
        params = work / "params.yaml"
        if any(work.iterdir()) and not (params.is_file() and params.read_text().startswith(MARK)):
            raise SystemExit(f"{work}: --work is not empty and holds no trial's params.yaml; choose an empty or new folder")
        shutil.rmtree(work)
    work.mkdir(parents=True)


def run_stage(stage: str, model: str, work: Path) -> float:
    """Run one stage script in `work` (its output shown as it comes); its wall-clock seconds."""
    command = [sys.executable, str(ROOT / "stages" / f"{stage}.py"), "--model", model]
    command += ["--no-recon"] if stage == "captions" else []
    start = time.perf_counter()
    if subprocess.run(command, cwd=work).returncode != 0:
        raise SystemExit(f"trial: `{' '.join(command[1:])}` failed (its error is above); the run in {work} is kept")
    return time.perf_counter() - start


def score_fixed(params: dict, work: Path) -> float:
    """Seconds score spends outside its work on the photographs: the start of its script, and loading the CLIP
    and RoBERTa it scores with (loaded here once more, as stages/score.py loads them)."""
    from conngeo.families.base import checked_folder
    from conngeo.references import load_reference
    from conngeo.scoring import BERTScore

    start = time.perf_counter()
    subprocess.run([sys.executable, str(ROOT / "stages" / "score.py"), "--help"], cwd=work, check=True,
                   capture_output=True)
    cfg, device = params["score"], params["device"]
    clip = cfg["clip"]
    load_reference("clip", clip["source"], revision=clip["revision"], device=device, dtype=clip["dtype"],
                   pooling="cls", hub=clip["hub"])
    bert = BERTScore(cfg["bertscore_model"], num_layers=cfg["bertscore_num_layers"], idf=cfg["bertscore_idf"],
                     rescale_with_baseline=cfg["bertscore_rescale"], batch_size=cfg["bertscore_batch_size"],
                     device=device, source=cfg["bertscore_source"] and checked_folder(cfg["bertscore_source"],
                                                                                      cfg["bertscore_revision"]))
    bert.prepare(["a"])
    return time.perf_counter() - start


def folder_bytes(folder: Path, name: str | None = None) -> int:
    return sum(p.stat().st_size for p in folder.rglob(name or "*") if p.is_file())


def duration(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 5400 else f"{seconds / 60:.1f} min" if seconds >= 90 else f"{seconds:.0f} s"


def size(nbytes: float) -> str:
    return f"{nbytes / 2**30:.1f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.1f} MiB"


@app.command()
def main(
    images: Path = typer.Option(..., help="the trial's photographs, as scripts/import_coco.py writes them (~20)"),
    profile: list[Path] = typer.Option([ROOT / "profiles/real.yaml"], help="params profile(s) merged over "
                                       "params.yaml in this order (repeatable)"),
    model: list[str] = typer.Option([], help="only these models (repeatable; default every model of the profile)"),
    work: Path = typer.Option(ROOT / "data/trial", help="where the stages run and write (emptied first)"),
    project: list[int] = typer.Option([5000, 40504], help="photograph counts to project time and disk for (repeatable)"),
):
    """Run the real checkpoints on a few photographs through extract -> captions -> score; print the captions,
    each stage's time and a projection of time and disk for N photographs."""
    from conngeo.captions import read_table
    from conngeo.data.images import scan

    photos = scan(images).items
    if not photos:
        raise SystemExit(f"{images}: no photographs; import a few with scripts/import_coco.py --limit 20 (see --help)")
    params, sets = trial_params(profile, images, model)
    fresh(work)
    (work / "params.yaml").write_text(MARK + yaml.safe_dump(params, sort_keys=False))
    n, models = len(photos), list(params["models"])
    typer.echo(f"trial: {n} photographs from {images}, models {', '.join(models)}, device {params['device']}; "
               f"stages run in {work}")

    walls = {(m, s): run_stage(s, m, work) for m in models for s in STAGES}
    fixed, score_start = {}, score_fixed(params, work)
    for (m, s), wall in walls.items():
        if s == "score":
            fixed[m, s] = min(score_start, wall)
        else:  # the stage's own record: its work, of which loading the model
            took = json.loads((work / "logs/timings" / s / f"{m}.json").read_text())
            fixed[m, s] = wall - (took["total"] - took["load"])

    references = {it.stem: it.references for it in photos}
    captions = {m: read_table(work / "data/captions" / m / "captions.csv") for m in models}
    width = max(map(len, models))
    typer.echo(f"\ncaptions from E_post (greedy, at most {params['captions']['max_new_tokens']} new tokens), "
               "under the first reference:")
    for i, stem in enumerate(captions[models[0]]["stem"]):
        typer.echo(f"  {stem}: {(references[stem] or ['(no reference)'])[0]}")
        for m in models:
            typer.echo(f"    {m:{width}s}  {captions[m]['post'][i]}")
    typer.echo("\nscores of those captions (mean over the photographs):")
    for m in models:
        post = json.loads((work / "metrics/score" / f"{m}.json").read_text())["post"]
        typer.echo(f"  {m:{width}s}  CLIPScore {post['clipscore']}, RefCLIPScore {post['refclipscore']}, "
                   f"BERTScore F1 {post['bertscore_f1']}")

    typer.echo(f"\nstage times for {n} photographs (s): wall = fixed + per photo x {n}")
    typer.echo(f"  {'model':{width}s}  {'stage':8s}  {'wall':>7s}  {'fixed':>7s}  {'per photo':>9s}")
    for (m, s), wall in walls.items():
        typer.echo(f"  {m:{width}s}  {s:8s}  {wall:7.1f}  {fixed[m, s]:7.1f}  {(wall - fixed[m, s]) / n:9.3f}")

    typer.echo("\nprojection: fixed + per photo x N; disk: the trial's bytes per photograph x N")
    typer.echo(f"  {'model':{width}s}  {'':12s}" + "".join(f"  {f'N = {c:,}':>12s}" for c in project))
    time_all, disk_all = dict.fromkeys(project, 0.0), dict.fromkeys(project, 0.0)
    for m in models:
        for s in STAGES:
            values = [fixed[m, s] + (walls[m, s] - fixed[m, s]) / n * c for c in project]
            typer.echo(f"  {m:{width}s}  {s:12s}" + "".join(f"  {duration(v):>12s}" for v in values))
            for c, v in zip(project, values):
                time_all[c] += v
        per_photo = {"vectors": folder_bytes(work / "data/vectors" / m) / n,
                     "recon E_pre": folder_bytes(work / "data/vectors" / m, "pre.safetensors") / n}
        for label, nbytes in per_photo.items():
            typer.echo(f"  {m:{width}s}  {label:12s}" + "".join(f"  {size(nbytes * c):>12s}" for c in project))
            for c in project:
                disk_all[c] += nbytes * c
    typer.echo(f"  {'all':{width}s}  {'time':12s}" + "".join(f"  {duration(time_all[c]):>12s}" for c in project))
    typer.echo(f"  {'all':{width}s}  {'disk':12s}" + "".join(f"  {size(disk_all[c]):>12s}" for c in project))
    typer.echo(f"\nThe real run's captions stage generates twice per photograph (from E_post and from the "
               f"reconstruction) and perturb once per perturbation set ({sets} in the profile): about 2 and {sets} "
               "times captions' per-photo time. Not run here: references, geometry, recon, recon_export, recon_eval, "
               "report (docs/real-study.md).")

if __name__ == "__main__":
    app()
