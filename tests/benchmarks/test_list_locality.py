"""bench/list_locality.py --smoke: the layout / list-overlap diagnostic's code on the CPU (Triton interpreter, set
before triton is first imported): every variant passes its check against the NHD per-head run and gets a row."""
from bench_smoke import smoke_rows


def test_smoke_run_checks_every_layout_and_list_variant():
    rows = smoke_rows("list_locality")
    lists = {(r["shape"], r["impl"]) for r in rows if r["name"] == "list_attend"}
    assert lists == {(f"b{b}_ctx1024_{sel}", f"ucm_{layout}_{kind}") for b in (1, 2)
                     for sel in ("ratio0.3", "budget2048") for layout in ("nhd", "hnd")
                     for kind in ("per_head", "heads_share_list")}
    assert {r["impl"] for r in rows if r["name"] == "dense_attend"} == {"ucm_nhd", "ucm_hnd"}
    assert all(r["median_ms"] > 0 for r in rows)
