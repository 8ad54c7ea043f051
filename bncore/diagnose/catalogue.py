"""docs/diagnoses.md, written from the rules themselves (:func:`diagnoses_markdown`; a test
keeps the file current): what each rule checks, its threshold and why, the fix, papers and
user reports."""

from __future__ import annotations

from bncore.diagnose.rules import RULES

__all__ = ["diagnoses_markdown"]

INTRO = """\
# What the BN doctor diagnoses

Generated from `bncore/diagnose/rules/` (`bncore.diagnose.catalogue.diagnoses_markdown()`);
tests/bncore/diagnose/test_rules.py keeps it current.

Every run BN Scope records, whatever trains it (its own engine, a user's script through
`bnscope.client`, Lightning, Hugging Face), is checked by these rules as its records arrive.
Each diagnosis names the pitfall (`rule`, a stable id), how grave it is (`severity`: **error**,
the results are wrong; **warning**, it likely costs accuracy; **info**, a choice worth knowing),
the layers, the first step, the numbers that fired beside their threshold, one sentence, the
fix, and references. `GET /api/runs/{id}/diagnoses` lists them; the run view opens with them;
a user's script gets each as a Python warning; `bnscope train` prints them.

Thresholds are grounded in the run's own sampling noise where a statistic has one (the spread
of a healthy window, so that correlated positions within an example do not make every image
model look sick), otherwise in a paper; each rule that needs the running statistics to settle
waits for their warm-up (3 / momentum steps, at most 300 and a quarter of the run). A rule
whose records a run lacks says so ("not checked: needs ...") instead of guessing. A diagnosis
can be silenced per run (test-time BN trips validation-in-train-mode on purpose).
"""


def diagnoses_markdown() -> str:
    """The catalogue of every rule, as Markdown."""
    lines = [INTRO, "| rule | severity | checks |", "|---|---|---|"]
    lines += [f"| [`{r.id}`](#{r.id}) | {r.severity} | {_cell(r.checks)} |" for r in RULES]
    for rule in RULES:
        lines += ["", f"## {rule.id}", "", f"**{rule.severity}**: {rule.checks}.", ""]
        lines += [rule.threshold, "", f"**Fix:** {rule.fix}.", "", "**References:**", ""]
        lines += [f"- {_reference(ref)}" for ref in rule.references]
    return "\n".join(lines) + "\n"


def _cell(text: str) -> str:
    """Text for a Markdown table cell (a | would end it)."""
    return text.replace("|", "\\|")


def _reference(ref: str) -> str:
    """A GitHub issue (owner/repo#N) as a link; anything else as it is."""
    repo, sep, number = ref.partition("#")
    if sep and number.isdigit() and repo.count("/") == 1 and " " not in repo:
        return f"[{ref}](https://github.com/{repo}/issues/{number})"
    if ref.startswith(("http://", "https://")):
        return f"<{ref}>"
    if ref.startswith("discuss.pytorch.org"):
        return f"<https://{ref}>"
    return ref
