"""tools/elastic_probe.py under horovodrun's elastic driver: MXNet ranks recover in place from a lost rank and grow.

One job (docs/elastic.md): 3 ranks, one SIGKILLs itself mid-run, the two survivors catch the failed collective
(an MXNetError), shut Horovod down, re-initialise, restore the last commit and go on, every collective checked
exactly; then the test's discovery script lists a new host and the job grows back to 3 at the next commit.
Under a minute on a quiet 2-core machine; a survivor that is not next to the dead rank may wait out Gloo's
30 s timeout before it sees the failure.
"""
import pytest

from tools import elastic_probe


@pytest.mark.timeout(300)
def test_lose_one_of_three_then_grow_back(tmp_path):
    args = elastic_probe.parse_args(["--scenario", "both", "--steps", "30", "--kill-step", "6", "--kill-rank", "0",
                                     "--timeout", "240", "--work", str(tmp_path)])
    checks, summary = elastic_probe.run_scenario(args)
    failed = {name: evidence for name, (ok, evidence) in checks.items() if not ok}
    assert not failed, "failed checks %s; logs in %s" % (failed, tmp_path)
    # every survivor saw the failure as an MXNetError, not as Horovod's own HorovodInternalError
    assert {f["type"] for f in summary["failures"]} == {"mxnet.base.MXNetError"}
    # the job ended on 3 ranks after running on 3, then 2, then 3, all in agreement
    done = summary["done"]
    assert sorted(e["rank"] for e in done) == [0, 1, 2] and {e["size"] for e in done} == {3}
    history = done[0]["history"]
    assert all(e["history"] == history for e in done) and len(history) == done[0]["step"] >= 30
    changes = [size for i, size in enumerate(history) if i == 0 or size != history[i - 1]]
    assert changes == [3, 2, 3], history
