"""Write .dvc/plots/offline.html: dvc's page template with vega, vega-lite and vega-embed inlined, so that
the page `dvc plots show` writes draws its charts without a network (dvc's default page loads them from a
CDN). Same versions as dvc-render's default page; all three BSD-3-Clause. Made once, committed:

    npm install --legacy-peer-deps vega@5.20.2 vega-lite@5.2.0 vega-embed@6.18.2
    python scripts/offline_plots_template.py node_modules
"""

import json
from pathlib import Path

import typer


def main(node_modules: Path, out: Path = Path(".dvc/plots/offline.html")):
    """Inline the three libraries from NODE_MODULES into OUT."""
    scripts = []
    for name in ("vega", "vega-lite", "vega-embed"):
        package = node_modules / name
        version = json.loads((package / "package.json").read_text())["version"]
        code = (package / "build" / f"{name}.min.js").read_text()
        if "</script" in code.lower() or "{plot_divs}" in code or "{refresh_tag}" in code:
            raise SystemExit(f"{name}: cannot be inlined as it is (holds a closing script tag or a dvc placeholder)")
        scripts.append(f"<!-- {name} {version}, BSD-3-Clause, https://github.com/vega/{name} -->\n<script>{code}</script>")
    page = ("<!DOCTYPE html>\n<html>\n<head>\n    {refresh_tag}\n    <title>DVC Plot</title>\n"
            + "\n".join(scripts)
            + "\n    <style>\n        table {\n            border-spacing: 15px;\n        }\n    </style>\n"
            "</head>\n<body>\n    {plot_divs}\n</body>\n</html>\n")
    out.write_text(page)
    typer.echo(f"offline_plots_template: {out} ({len(page) / 1024:.0f} KiB)")


if __name__ == "__main__":
    typer.run(main)
