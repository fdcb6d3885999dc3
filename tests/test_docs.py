"""The README and NOTES.md stay readable, and the code's pointers into NOTES.md name real rows."""
import glob
import os
import re
import statistics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ABBREVIATIONS = r"(?:e\.g|i\.e|Eq|Sec|Fig|App|etc|vs|al)\."


def read(name):
    with open(os.path.join(ROOT, name), encoding="utf-8") as f:
        return f.read()


def prose_and_cells(text):
    """Markdown -> (sentences of its prose and list items, cells of its tables); code blocks skipped."""
    paragraphs, cells, current, in_code = [], [], [], False
    for line in text.splitlines() + [""]:
        if line.startswith("```"):
            in_code = not in_code
            continue
        s = line.strip()
        if in_code or s.startswith("<!--"):
            continue
        if s.startswith("|"):
            cells += [c.strip() for c in s.strip("|").split("|")]
            s = ""
        starts_item = s.startswith("- ") or re.match(r"\d+\. ", s)
        if (not s or s.startswith(("#", "![")) or starts_item) and current:
            paragraphs.append(" ".join(current))
            current = []
        if s and not s.startswith(("#", "![")):
            current.append(re.sub(r"^(- |\d+\. )", "", s))
    sentences = []
    for p in paragraphs:
        p = re.sub(ABBREVIATIONS, lambda m: m.group(0).replace(".", "\0"), p)
        sentences += [s.replace("\0", ".") for s in re.split(r"(?<=[.!?])\s+(?=[A-Z`(\"'*\[])", p) if s]
    return sentences, cells


def test_readme_is_short_with_short_sentences_and_cells():
    text = read("README.md")
    assert len(text.splitlines()) <= 250
    sentences, cells = prose_and_cells(text)
    words = [len(s.split()) for s in sentences]
    assert statistics.median(words) <= 20, statistics.median(words)
    assert max(words) <= 60, max(zip(words, sentences))
    assert max(len(c) for c in cells) < 300, max(cells, key=len)
    assert "pip install -r requirements.txt && python train.py" in text
    assert "pip install -r requirements.txt && python -m pytest -q -n 2" in text


def test_notes_rows_are_dated_with_short_cells():
    text = read("NOTES.md")
    rows = [line for line in text.splitlines() if line.startswith("| 20")]
    assert len(rows) > 50
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert len(cells) == 6, row                                      # date, question, setting, images, metrics, verdict
        assert re.fullmatch(r"\d{4}-\d\d-\d\d", cells[0]), row
        assert max(len(c) for c in cells) < 300, row
    for phrase in ("this stop", "last stop", "slow day", "fast day", "last session"):
        assert phrase not in text.lower(), phrase


def test_code_points_only_inside_the_repository_and_to_real_notes_rows():
    questions = set(re.findall(r"^\| \d{4}-\d\d-\d\d \| ([^|]+?) \|", read("NOTES.md"), re.M))
    files = sorted(glob.glob(os.path.join(ROOT, "*.py")) + glob.glob(os.path.join(ROOT, "tests", "*.py")))
    pointers = 0
    for path in files + [os.path.join(ROOT, "README.md")]:
        text = open(path, encoding="utf-8").read()
        if not path.endswith("test_docs.py"):
            assert not re.search(r"\.\./shared|DESIGN\.md|PAPER\.md|STYLE\.md|RESEARCH\.md", text), path
        for inside in re.findall(r"NOTES\.md, ([^)]*)\)", text):
            for question in re.findall(r'"([^"]+)"', inside):
                assert question in questions, (os.path.basename(path), question)
                pointers += 1
    assert pointers > 10
