"""The README's reading map is the one tools/reading_map.py derives from the code: ranges found by name, so a moved
function changes the table, and this test says the README's copy must be printed again."""
import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_readme_map_of_the_core_matches_the_code():
    spec = importlib.util.spec_from_file_location("reading_map", ROOT / "tools" / "reading_map.py")
    reading_map = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(reading_map)
    readme = (ROOT / "README.md").read_text()
    start, end = readme.index("<!-- reading map -->\n"), readme.index("<!-- /reading map -->")
    table = reading_map.table()
    assert readme[start + len("<!-- reading map -->\n"):end] == table, "run python tools/reading_map.py --write"
    total = int(table.rsplit("\n\n", 1)[1].split()[0])
    whole = int(table.rsplit(" and ", 1)[1].split()[0].replace(",", ""))
    assert total <= 700  # the core reads in one sitting
    assert whole <= 3000  # and the whole path in an afternoon or so
