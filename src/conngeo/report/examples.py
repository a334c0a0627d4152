"""The examples page (results/examples/index.html): per model, the images behind the report's numbers.

    reconstruction  test images whose caption from connector(reconstructed E_pre) differs from the native
                    (post) one, the most changed first, then a few where it is the same: the thumbnail, the
                    references, both captions with the changed words marked, lm_error, 1 - BERTScore F1
                    and the KNOR change
    <mode>          per perturbation mode, the images most and least unstable at the common fraction F: the
                    caption at every level beside its actual fraction, the words that changed marked
    neighbours      the images with the largest and the smallest neighbourhood change, with their nearest
                    neighbours in E_pre and in E_post side by side, the shared ones marked

Anchors: #<model>, #<model>-reconstruction, #<model>-<mode>, #<model>-neighbours (`anchor`), so that a
figure or a row of question.md can link to its examples. The page is offline and self-contained: no script,
thumbnails (JPEG, the longer side at most `thumbnail` pixels, never enlarged) in thumbs/ beside it, named by
a hash of the stem, and a Content-Security-Policy that forbids any other load. Every text that comes from
the inputs (stems, captions, references, model names) is escaped.

The selection, the word diff and the rendering are pure functions of the report's tables; `write_page`
reads the images and writes the files.
"""

from __future__ import annotations

import difflib
import hashlib
import math
import shutil
from dataclasses import dataclass, field
from html import escape
from pathlib import Path

import pandas as pd
from PIL import Image

from .. import layout
from ..data.images import BadImageError, Item, load_image, scan

JPEG_QUALITY = 85
SECTIONS = ("reconstruction", "neighbours")  # and one per perturbation mode, between them


def anchor(model: str, section: str | None = None) -> str:
    """The page's fragment id of a model, or of one of its sections ("reconstruction", a mode, "neighbours")."""
    return model if section is None else f"{model}-{section}"


# -- selection ----------------------------------------------------------------------------------------------

def ranked(values: pd.Series, ascending: bool) -> list[str]:
    """The stems (index) of `values` ordered by value, ties by stem; NaN left out."""
    v = values.dropna()
    frame = pd.DataFrame({"stem": v.index.astype(str), "value": v.to_numpy(float)})
    return frame.sort_values(["value", "stem"], ascending=[ascending, True], kind="stable")["stem"].tolist()


def extremes(values: pd.Series, count: int) -> tuple[list[str], list[str]]:
    """(the `count` stems with the largest values, largest first; the `count` with the smallest, smallest
    first, none of them among the largest): ties by stem, NaN left out."""
    largest = ranked(values, ascending=False)[:count]
    taken = set(largest)
    return largest, [s for s in ranked(values, ascending=True) if s not in taken][:count]


def reconstruction_examples(table: pd.DataFrame, changed: int, identical: int) -> tuple[list[str], list[str]]:
    """Test images of `table` (by stem: split, post, recon, bertscore_instability, lm_error): (`changed` whose
    recon caption differs from the post caption, the largest 1 - BERTScore F1 first, then the largest
    lm_error; `identical` whose two captions are the same, the largest lm_error first), ties by stem."""
    test = table[table["split"] == "test"]
    same = test["post"].fillna("") == test["recon"].fillna("")
    moved = test[~same]
    order = pd.DataFrame({"stem": moved.index.astype(str), "f1": moved["bertscore_instability"].to_numpy(float),
                          "error": moved["lm_error"].to_numpy(float)})
    order = order.sort_values(["f1", "error", "stem"], ascending=[False, False, True], na_position="last")
    return order["stem"].tolist()[:changed], ranked(test.loc[same, "lm_error"], ascending=False)[:identical]


def unstable_examples(instability: pd.Series, count: int) -> tuple[list[str], list[str]]:
    """(the `count` most unstable images, the most first, only those whose captions moved (instability > 0);
    the `count` least unstable, the least first, none of the former), ties by stem."""
    most = ranked(instability[instability > 0], ascending=False)[:count]
    taken = set(most)
    return most, [s for s in ranked(instability, ascending=True) if s not in taken][:count]


@dataclass
class Selection:
    """The images one model's sections show, in display order."""
    changed: list[str]
    identical: list[str]
    unstable: dict[str, tuple[list[str], list[str]]]        # mode -> (most unstable, least)
    neighbourhoods: tuple[list[str], list[str]]             # (largest KNOR change, smallest)
    neighbours: dict[str, tuple[list[str], list[str]]] = field(default_factory=dict)  # stem -> (E_pre, E_post)

    def stems(self) -> set[str]:
        """Every image the sections show, the neighbours included."""
        out = set(self.changed) | set(self.identical) | set(self.neighbourhoods[0]) | set(self.neighbourhoods[1])
        for most, least in self.unstable.values():
            out |= set(most) | set(least)
        for pre, post in self.neighbours.values():
            out |= set(pre) | set(post)
        return out


def neighbour_lists(neighbours: pd.DataFrame, stem: str, count: int) -> tuple[list[str], list[str]]:
    """(E_pre's, E_post's) `count` nearest images of `stem` from a geometry neighbours table (by stem:
    pre_1.., post_1.., nearest first)."""
    row = neighbours.loc[stem]
    return tuple([str(row[f"{side}_{j}"]) for j in range(1, count + 1) if f"{side}_{j}" in row.index]
                 for side in ("pre", "post"))


def select(table: pd.DataFrame, neighbours: pd.DataFrame | None, modes: list, settings: dict) -> Selection:
    """What one model's sections show (`settings`: params report.examples). `table`: the per-image table by
    stem (report.tables.per_image) with the post and recon captions; `neighbours`: the geometry stage's
    neighbours table by stem, or None where there is none (the section then says so)."""
    changed, identical = reconstruction_examples(table, settings["changed"], settings["identical"])
    unstable = {mode: unstable_examples(table[f"{mode}_instability"], settings["unstable"]) for mode in modes}
    if neighbours is None:
        return Selection(changed, identical, unstable, ([], []))
    listed = table.index[table.index.isin(neighbours.index)]
    largest, smallest = extremes(table.loc[listed, "knor_change"], settings["neighbourhoods"])
    return Selection(changed, identical, unstable, (largest, smallest),
                     {s: neighbour_lists(neighbours, s, settings["neighbours"]) for s in largest + smallest})


# -- word diff ----------------------------------------------------------------------------------------------

def word_diff(before: str, after: str) -> list[tuple[str, str]]:
    """The word-level edit from `before` to `after` (words split on white space), in reading order: (op,
    words) with op "same", "del" (only in `before`) or "ins" (only in `after`); difflib's longest matching
    blocks, no junk heuristic."""
    a, b = before.split(), after.split()
    out = []
    for tag, i1, i2, j1, j2 in difflib.SequenceMatcher(None, a, b, autojunk=False).get_opcodes():
        if tag == "equal":
            out.append(("same", " ".join(a[i1:i2])))
            continue
        if i2 > i1:
            out.append(("del", " ".join(a[i1:i2])))
        if j2 > j1:
            out.append(("ins", " ".join(b[j1:j2])))
    return out


def marked(ops: list[tuple[str, str]], side: str = "both") -> str:
    """HTML of a word diff: "before" (the same and deleted words, deletions in <del>), "after" (the same
    and inserted words, insertions in <ins>) or "both" (inline)."""
    keep = {"before": ("same", "del"), "after": ("same", "ins"), "both": ("same", "del", "ins")}[side]
    words = [escape(w) if op == "same" else f"<{op}>{escape(w)}</{op}>" for op, w in ops if op in keep]
    return " ".join(words) or '<span class="empty">(empty)</span>'


# -- images ---------------------------------------------------------------------------------------------------

def thumbnail(path: Path, size: int) -> Image.Image:
    """The image at `path` as RGB, its longer side at most `size` pixels (aspect kept, never enlarged)."""
    img = load_image(path)
    img.thumbnail((size, size), Image.Resampling.LANCZOS)
    return img


def save_jpeg(img: Image.Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, "JPEG", quality=JPEG_QUALITY)


def thumb_name(stem: str) -> str:
    """The thumbnail's file name: a hash of the stem, so that any stem (commas, quotes, any script) is a
    plain file name and URL."""
    return hashlib.sha1(stem.encode("utf-8")).hexdigest()[:16] + ".jpg"


def find_images(root: Path) -> dict[str, Item]:
    """stem -> image (path, references) under an image root; empty where the root does not exist."""
    return {it.stem: it for it in scan(root).items} if Path(root).is_dir() else {}


@dataclass
class Thumb:
    src: str
    width: int
    height: int


# -- rendering ------------------------------------------------------------------------------------------------

@dataclass
class Page:
    """What every section of the page reads besides its model's tables."""
    thumbs: dict[str, Thumb]              # stem -> thumbnail written (missing: no image under the root)
    references: dict[str, list[str]]      # stem -> reference captions
    image_root: str
    modes: list
    levels: list
    fractions: dict                       # mode -> the common fraction F
    k: int
    settings: dict                        # params report.examples


def number(v) -> str:
    v = float(v)
    return "–" if math.isnan(v) else f"{v:.3g}"


def text(v) -> str:
    """A caption cell as a string (an empty caption is read as NaN)."""
    return "" if v is None or (isinstance(v, float) and math.isnan(v)) else str(v)


def image(stem: str, page: Page, css: str = "thumb", shared: bool = False) -> str:
    """The thumbnail of `stem` with its stem beneath, or a placeholder where the image root lacks it."""
    cls = css + (" shared" if shared else "")
    t = page.thumbs.get(stem)
    if t is None:
        body = f'<span class="{cls} missing">not in this sample</span>'
    else:
        body = (f'<img class="{cls}" src="thumbs/{t.src}" width="{t.width}" height="{t.height}" '
                f'alt="{escape(stem)}">')
    return f'<figure title="{escape(stem)}">{body}<figcaption>{escape(stem)}</figcaption></figure>'


def references_cell(stem: str, page: Page) -> str:
    refs = page.references.get(stem)
    if not refs:
        return '<td class="refs"><span class="empty">(none found)</span></td>'
    return '<td class="refs"><ul>' + "".join(f"<li>{escape(r)}</li>" for r in refs) + "</ul></td>"


def note_row(columns: int, message: str) -> str:
    return f'<tr class="note"><td colspan="{columns}">{message}</td></tr>'


def group(title: str, rows: list[str], columns: int, empty: str) -> str:
    """One <tbody>: a title row, then `rows`, or a note saying there are none."""
    return (f'<tbody><tr class="group"><th colspan="{columns}">{title}</th></tr>'
            + ("".join(rows) or note_row(columns, empty)) + "</tbody>")


def head(*titles: str) -> str:
    return "<thead><tr>" + "".join(f"<th>{t}</th>" for t in titles) + "</tr></thead>"


def num(v) -> str:
    return f'<td class="num">{number(v)}</td>'


def reconstruction_section(model: str, table: pd.DataFrame, sel: Selection, page: Page) -> str:
    test = table[table["split"] == "test"]
    moved = int((test["post"].fillna("") != test["recon"].fillna("")).sum())

    def row(stem):
        r = table.loc[stem]
        ops = word_diff(text(r["post"]), text(r["recon"]))
        return (f"<tr><td>{image(stem, page)}</td>{references_cell(stem, page)}"
                f'<td class="caption">{marked(ops, "before")}</td><td class="caption">{marked(ops, "after")}</td>'
                f'{num(r["lm_error"])}{num(r["bertscore_instability"])}{num(r["knor_change"])}</tr>')

    body = (head("image", "references", "native caption (E_post)", "caption from connector(reconstructed E_pre)",
                 "lm_error", "1 − BERTScore F1", f"KNOR change (1 − KNOR@{page.k})")
            + group("Changed, the most first", [row(s) for s in sel.changed], 7, "no test image's caption changed")
            + group("Identical, the largest lm_error first", [row(s) for s in sel.identical], 7,
                    "no test image's caption stayed the same"))
    intro = (f"{moved} of {len(test)} test images get a different caption from connector(reconstructed E_pre) "
             "than the native one. Words only in the native caption are struck through, words only in the "
             "reconstruction's caption highlighted.")
    return section(anchor(model, "reconstruction"), "Captions from the reconstruction (test images)", intro, body)


def perturbation_section(model: str, m, table: pd.DataFrame, mode: str, sel: Selection, page: Page) -> str:
    f = page.fractions[mode]

    def row(stem):
        post = text(table.loc[stem, "post"])
        levels = [f'<li><span class="level">native (E_post)</span> {marked(word_diff(post, post))}</li>']
        for lv in page.levels:
            perturbed = m.scores[f"{mode}_{lv}"].loc[stem]
            levels.append(f'<li><span class="level">{escape(str(lv))} → {number(perturbed["fraction"])}</span> '
                          f'{marked(word_diff(post, text(perturbed["caption"])))}</li>')
        return (f'<tr><td>{image(stem, page)}</td>{num(table.loc[stem, f"{mode}_instability"])}'
                f'<td class="caption"><ul class="levels">{"".join(levels)}</ul></td></tr>')

    most, least = sel.unstable[mode]
    body = (head("image", f"instability at F = {number(f)}",
                 "caption at each level (nominal → actual fraction changed)")
            + group("Most unstable", [row(s) for s in most], 3, "no image's caption moved at any level")
            + group("Least unstable", [row(s) for s in least], 3, "no image has this measure"))
    intro = (f"Instability: the mean of 1 − BERTScore F1 against the native caption over the actual {escape(mode)} "
             f"fraction [0, F], F = {number(f)} the largest every model reaches. Against the native caption, "
             "removed words are struck through and new ones highlighted.")
    return section(anchor(model, mode), f"{escape(mode)}: the most and the least unstable", intro, body)


def neighbours_section(model: str, table: pd.DataFrame, sel: Selection, has_table: bool, page: Page) -> str:
    absent = set()

    def row(stem):
        pre, post = sel.neighbours[stem]
        both = set(pre) & set(post)
        absent.update(s for s in pre + post if s not in page.thumbs)
        strips = "".join('<td><div class="strip">' + "".join(image(s, page, "small", s in both) for s in side)
                         + "</div></td>" for side in (pre, post))
        return f'<tr><td>{image(stem, page)}</td>{num(table.loc[stem, "knor_change"])}{strips}</tr>'

    largest, smallest = sel.neighbourhoods
    body = (head("image", f"KNOR change (1 − KNOR@{page.k})", "nearest in E_pre", "nearest in E_post")
            + group("Largest neighbourhood change", [row(s) for s in largest], 4, "no image has this measure")
            + group("Smallest neighbourhood change", [row(s) for s in smallest], 4, "no image has this measure"))
    if not has_table:
        where = escape(str(layout.data("geometry", model) / "neighbours.csv"))
        body = head("image", "", "nearest in E_pre", "nearest in E_post") + (
            "<tbody>" + note_row(4, f"Not in this sample: no neighbours table ({where}). Rerun <code>dvc repro "
                                    f"geometry@{escape(model)}</code>, or remake the sample with scripts/make_sample.py.")
            + "</tbody>")
    elif absent:
        body += "<tbody>" + note_row(4, f"Not in this sample: {len(absent)} neighbour images are not under "
                                        f"{escape(page.image_root)} (a sample carries only the images its page "
                                        "shows): " + ", ".join(escape(s) for s in sorted(absent))) + "</tbody>"
    intro = (f"The {page.settings['neighbours']} nearest images (pooled vectors, the knn stage's metric) of the "
             "images whose neighbourhood the connector changes most and least; outlined: in both lists.")
    return section(anchor(model, "neighbours"), "Nearest neighbours in E_pre and in E_post", intro, body)


def section(ident: str, title: str, intro: str, body: str) -> str:
    link = f'<a class="here" href="#{escape(ident)}">#</a>'
    return (f'<section class="examples" id="{escape(ident)}"><h3>{title} {link}</h3><p>{intro}</p>'
            f"<table>{body}</table></section>")


def model_section(model: str, m, table: pd.DataFrame, sel: Selection, has_neighbours: bool, page: Page) -> str:
    parts = ["reconstruction", *page.modes, "neighbours"]
    nav = " · ".join(f'<a href="#{escape(anchor(model, p))}">{escape(p)}</a>' for p in parts)
    return (f'<section class="model" id="{escape(anchor(model))}"><h2>{escape(model)}</h2><nav>{nav}</nav>'
            + reconstruction_section(model, table, sel, page)
            + "".join(perturbation_section(model, m, table, mode, sel, page) for mode in page.modes)
            + neighbours_section(model, table, sel, has_neighbours, page) + "</section>")


STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 0 1.5em 2em; color: #222; }
nav.models { position: sticky; top: 0; background: #fff; border-bottom: 1px solid #ccc; padding: .4em 0; z-index: 1; }
section { scroll-margin-top: 2.5em; }
h1 { font-size: 1.3em; margin: .3em 0; } h2 { margin-top: 1.5em; } h3 { font-size: 1.05em; }
header p { margin: .2em 0; max-width: 75em; }
nav a { margin-right: .2em; }
table { border-collapse: collapse; width: 100%; }
th, td { border-bottom: 1px solid #e4e4e4; padding: .3em .5em; text-align: left; vertical-align: top; }
tr.group th { background: #f2f2f2; }
tr.note td { color: #555; font-style: italic; }
td.num { font-variant-numeric: tabular-nums; white-space: nowrap; }
td.refs ul { margin: 0; padding-left: 1.2em; }
ul.levels { margin: 0; padding: 0; list-style: none; }
figure { display: inline-block; margin: 0 .3em .3em 0; text-align: center; }
figcaption { font-size: 10px; color: #666; max-width: 96px; overflow-wrap: anywhere; }
img.thumb, span.thumb { width: 96px; height: 96px; }
img.small, span.small { width: 56px; height: 56px; }
img { object-fit: contain; image-rendering: pixelated; background: #eee; }
img.shared, span.shared { outline: 3px solid #0072B2; outline-offset: -3px; }
span.missing { display: inline-flex; align-items: center; justify-content: center; background: #f6f6f6;
               color: #888; font-size: 10px; border: 1px dashed #bbb; box-sizing: border-box; }
.strip { display: flex; flex-wrap: wrap; }
del { background: #fbd3d0; color: #8a1c13; }
ins { background: #cdeccd; color: #17561b; text-decoration: none; }
.level { display: inline-block; min-width: 8em; color: #666; font-size: 12px; }
.empty { color: #999; }
a.here { color: #bbb; text-decoration: none; font-weight: normal; }
"""


def render_page(sections: list[str], models: list[str], page: Page) -> str:
    """The whole page around the models' sections."""
    picker = " · ".join(f'<a href="#{escape(anchor(m))}">{escape(m)}</a>' for m in models)
    fractions = ", ".join(f"{escape(mode)} {number(f)}" for mode, f in page.fractions.items())
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; img-src 'self'; style-src 'unsafe-inline'">
<title>conngeo: examples</title>
<style>{STYLE}</style>
</head>
<body>
<header>
<h1>Examples: the images behind the numbers</h1>
<p>Per model: the test images whose caption from connector(reconstructed E_pre) moved, and a few where it did not;
per perturbation mode, the images most and least unstable at the common fraction ({fractions}); the nearest
neighbours in E_pre and E_post of the images whose neighbourhood changes most and least (KNOR@{page.k}).
Anchors: <code>#&lt;model&gt;-reconstruction</code>, <code>#&lt;model&gt;-&lt;mode&gt;</code>,
<code>#&lt;model&gt;-neighbours</code>.</p>
</header>
<nav class="models">Model: {picker}</nav>
{"".join(sections)}
</body>
</html>
"""


# -- the files ------------------------------------------------------------------------------------------------

def model_table(m, images: pd.DataFrame) -> pd.DataFrame:
    """One model's per-image table (report.tables.per_image) by stem, with its post and recon captions."""
    table = images.set_index("stem")
    return table.assign(post=m.captions["post"].reindex(table.index), recon=m.captions["recon"].reindex(table.index))


def read_neighbours(root: Path, model: str) -> pd.DataFrame | None:
    """The geometry stage's neighbours table of `model` under `root` by stem, or None where it has none."""
    path = layout.data("geometry", model, root) / "neighbours.csv"
    if not path.is_file():
        return None
    return pd.read_csv(path, dtype=str, keep_default_na=False).set_index("stem")


def write_page(out: Path, data: dict, per_image: dict[str, pd.DataFrame], neighbours: dict[str, pd.DataFrame | None],
               image_root: Path, modes: list, levels: list, fractions: dict, k: int, settings: dict) -> Path:
    """Write `out`/index.html and its thumbnails in `out`/thumbs (the folder is replaced as a whole).

    data: model -> report.tables.ModelInputs; per_image: model -> report.tables.per_image; neighbours: model ->
    read_neighbours; image_root: where the images and their references are (<root>/<shard>/<stem>.*, the
    study's data.root, or a sample's thumbnails); settings: params report.examples. Returns the page's path."""
    out = Path(out)
    found = find_images(image_root)
    tables = {name: model_table(m, per_image[name]) for name, m in data.items()}
    selections = {name: select(tables[name], neighbours.get(name), modes, settings) for name in data}
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    needed = sorted(set().union(*(s.stems() for s in selections.values())) & set(found))
    thumbs = {}
    for stem in needed:
        try:
            img = thumbnail(found[stem].path, settings["thumbnail"])
        except BadImageError:  # shown as missing: the page is not where an unreadable image is reported
            continue
        save_jpeg(img, tmp / "thumbs" / thumb_name(stem))
        thumbs[stem] = Thumb(thumb_name(stem), img.width, img.height)
    page = Page(thumbs, {s: found[s].references for s in needed}, str(image_root), modes, levels, fractions, k,
                settings)
    sections = [model_section(name, m, tables[name], selections[name], neighbours.get(name) is not None, page)
                for name, m in data.items()]
    (tmp / "thumbs").mkdir(parents=True, exist_ok=True)
    (tmp / "index.html").write_text(render_page(sections, list(data), page), encoding="utf-8")
    if out.exists():
        shutil.rmtree(out)
    tmp.replace(out)
    return out / "index.html"
