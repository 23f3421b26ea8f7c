"""perfmodel/schedule_tables.json (read by the performance model) matches a fresh simulation,
covers the documented grid and stays small."""
import json
from pathlib import Path

import pytest

from parallel.schedule_sim import TABLE_MICROBATCHES, TABLE_PP, table_entry
from parallel.schedules import SCHEDULES

TABLE = Path(__file__).resolve().parents[2] / "perfmodel" / "schedule_tables.json"


@pytest.fixture(scope="module")
def table():
    assert TABLE.stat().st_size < 500_000
    data = json.loads(TABLE.read_text())
    assert data["version"] == 1
    return {(e["schedule"], e["pp"], e["microbatches"], e["virtual_stages"]): e for e in data["entries"]}


@pytest.mark.parametrize("key", [("1f1b", 4, 8, 1), ("gpipe", 2, 4, 1), ("interleaved", 4, 8, 2),
                                 ("zbh1", 4, 16, 1), ("zbv", 8, 16, 2), ("vhalf", 4, 8, 2), ("vmin", 8, 8, 2),
                                 ("none", 1, 4, 1), ("1f1b", 16, 2, 1)])
def test_entries_match_a_fresh_simulation(table, key):
    assert table[key] == table_entry(*key)


def test_table_covers_the_grid(table):
    for schedule in SCHEDULES:
        for pp in TABLE_PP:
            for m in TABLE_MICROBATCHES:
                if schedule == "none" and pp > 1:
                    assert (schedule, pp, m, 1) not in table
                elif schedule == "interleaved":
                    assert (schedule, pp, m, 1) in table
                    assert ((schedule, pp, m, 4) in table) == (m % pp == 0)
                else:
                    assert (schedule, pp, m, 2 if schedule in ("zbv", "vhalf", "vmin") else 1) in table
    for entry in table.values():
        assert len(entry["peak_activations"]) == entry["pp"] and 0 <= entry["bubble_fraction"] < 1
