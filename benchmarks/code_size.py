"""Size of the `llada_jax/` package: raw lines and code lines, now and at a base revision.

    python benchmarks/code_size.py                    # against 42ab7a0 (before issue 13)
    python benchmarks/code_size.py --base=HEAD~3 --files

Code lines are the lines that hold a Python token other than a comment or a docstring (blank
lines, comment lines and docstrings do not count); raw lines are every line of every `.py` file.
"At equal features" leaves out the files of features the base did not have (serving, MoE);
their sizes are printed on their own. Those features also added code to files the base had
(the MoE fields of ModelConfig, the expert axis, the router losses in the train step, the
sampler's streaming hook and per-row keys): `FEATURE_COMMITS` names the commits that did, and
`feature_code_in_shared_files` is what each added to those files, measured on its own diff
(code lines of each file after the commit minus before). `equal_features_code_lines_adjusted`
subtracts it; the unadjusted figure stays the conservative one. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import ast
import io
import json
import os
import subprocess
import tokenize

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Files of features added after the base revision (issues 16, 17).
NEW_FEATURE_FILES = ("llada_jax/serving/", "llada_jax/model/moe.py",
                     "llada_jax/interop/llada_moe.py", "llada_jax/interop/llada2.py")

# Commits of issues 16 (mixture of experts) and 17 (serving) that added code to files the base
# already had (found with `git log --no-merges 42ab7a0..HEAD -- llada_jax/`, one per feature).
FEATURE_COMMITS = {
    "160886a": "issue 16: the expert mesh axis",
    "51f3586": "issue 16: MoE fields of ModelConfig, dense_blocks, QK-norm, partial rotary",
    "4c91c42": "issue 16: router losses and expert-bias update in the train step",
    "f5bdada": "issue 16: weight_tying and fused-key groups for the MoE layouts",
    "927959f": "issue 16: active-parameter FLOPs",
    "0550875": "issue 16: train.moe_* weights, expert divisibility of the mesh",
    "bcea1d6": "issue 17: the sampler's streaming hook",
    "0114ea3": "issue 17: one PRNG key per row (batched sampled requests)",
}


def code_lines(source: str) -> int:
    """Lines holding a token that is not a comment, a docstring or layout."""
    docstring_lines: set[int] = set()
    for node in ast.walk(ast.parse(source)):
        body = getattr(node, "body", None)
        if (isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                and body and isinstance(body[0], ast.Expr)
                and isinstance(body[0].value, ast.Constant)
                and isinstance(body[0].value.value, str)):
            docstring_lines.update(range(body[0].lineno, body[0].end_lineno + 1))
    layout = {tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT,
              tokenize.ENDMARKER}
    lines: set[int] = set()
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type not in layout:
            lines.update(range(token.start[0], token.end[0] + 1))
    return len(lines - docstring_lines)


def package_files(revision: str | None) -> dict[str, str]:
    """{path: source} of every .py file under llada_jax/, in the work tree or at a revision."""
    if revision is None:
        out = {}
        for folder, _, names in os.walk(os.path.join(ROOT, "llada_jax")):
            for name in names:
                if name.endswith(".py"):
                    path = os.path.join(folder, name)
                    with open(path, encoding="utf-8") as f:
                        out[os.path.relpath(path, ROOT)] = f.read()
        return out
    listing = subprocess.run(["git", "-C", ROOT, "ls-tree", "-r", "--name-only", revision,
                              "llada_jax/"], check=True, capture_output=True, text=True).stdout
    return {path: subprocess.run(["git", "-C", ROOT, "show", f"{revision}:{path}"], check=True,
                                 capture_output=True, text=True).stdout
            for path in listing.split() if path.endswith(".py")}


def _show(revision: str, path: str) -> str:
    out = subprocess.run(["git", "-C", ROOT, "show", f"{revision}:{path}"], capture_output=True,
                         text=True)
    return out.stdout if out.returncode == 0 else ""


def feature_code_in_shared_files() -> dict[str, int]:
    """{commit: code lines it added to files outside NEW_FEATURE_FILES} for FEATURE_COMMITS."""
    added = {}
    for commit in FEATURE_COMMITS:
        paths = subprocess.run(["git", "-C", ROOT, "diff-tree", "--no-commit-id", "-r",
                                "--name-only", f"{commit}^", commit, "--", "llada_jax/"],
                               check=True, capture_output=True, text=True).stdout.split()
        added[commit] = sum(code_lines(_show(commit, p)) - code_lines(_show(f"{commit}^", p))
                            for p in paths
                            if p.endswith(".py") and not p.startswith(NEW_FEATURE_FILES))
    return added


def measure(files: dict[str, str]) -> dict:
    sizes = {path: (code_lines(source), len(source.splitlines()))
             for path, source in sorted(files.items())}
    new = {p: s for p, s in sizes.items() if p.startswith(NEW_FEATURE_FILES)}
    old = {p: s for p, s in sizes.items() if p not in new}
    return {"code_lines": sum(s[0] for s in sizes.values()),
            "raw_lines": sum(s[1] for s in sizes.values()),
            "equal_features_code_lines": sum(s[0] for s in old.values()),
            "equal_features_raw_lines": sum(s[1] for s in old.values()),
            "new_feature_code_lines": sum(s[0] for s in new.values()),
            "files": sizes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="42ab7a0", help="git revision to compare with")
    parser.add_argument("--files", action="store_true", help="print the size of every file")
    args = parser.parse_args()
    now, base = measure(package_files(None)), measure(package_files(args.base))
    report = {"base": args.base, "now": now, "before": base,
              "code_lines_change": now["equal_features_code_lines"] / base["code_lines"] - 1,
              "raw_lines_change": now["equal_features_raw_lines"] / base["raw_lines"] - 1}
    added = feature_code_in_shared_files()
    report["feature_code_in_shared_files"] = {f"{c} ({FEATURE_COMMITS[c]})": n
                                              for c, n in added.items()}
    adjusted = now["equal_features_code_lines"] - sum(added.values())
    report["equal_features_code_lines_adjusted"] = adjusted
    report["code_lines_change_adjusted"] = adjusted / base["code_lines"] - 1
    if not args.files:
        for side in ("now", "before"):
            del report[side]["files"]
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
