"""claims.json's reader (propmaps_jax/results/claims_json.py): a folder without
the claims, a claims file of the first schema and a claim not computed each name
the experiment to run in one line; the provenance dates come from git and the run
folder."""

import datetime
import json
import os
import shutil
import time

import pytest
from conftest import ROOT

from propmaps_jax.errors import PropmapsError
from propmaps_jax.results import claims_json


def test_claims_of_a_folder_without_them_name_the_experiment(tmp_path):
    # No claims.json: one line naming the statistics experiment.
    with pytest.raises(PropmapsError) as error:
        claims_json.claim(str(tmp_path / "statistics"), "close_to_max")
    message = str(error.value)
    assert "\n" not in message
    assert "python launch.py --experiment=statistics" in message
    # A claims.json of the first schema (the committed runs' until 2026-12-07)
    # stays readable; its claims as the paper means them are not there: one line,
    # with the run's model.
    old = tmp_path / "schema1" / "statistics"
    old.mkdir(parents=True)
    (old / "claims.json").write_text(
        json.dumps({"rules": {}, "close_to_max": {"holds": True}})
    )
    (old / "summary.json").write_text(json.dumps({"model": "lenet"}))
    old = str(old)
    report = claims_json.read_claims(old)
    assert report["schema"] == 1 and "close_to_max" in report
    with pytest.raises(PropmapsError) as error:
        claims_json.claim(old, "centre_concentration")
    message = str(error.value)
    assert "\n" not in message and "predates" in message
    assert "python launch.py --experiment=statistics --model=lenet" in message
    # A claim whose maps were not computed (attacks of several pixels).
    folder = tmp_path / "multi" / "statistics"
    folder.mkdir(parents=True)
    (folder / "claims.json").write_text(
        json.dumps(
            {
                "schema": 2,
                "claims": {
                    "centre_concentration": {
                        "not_computed": "no control positions: attacks of more "
                        "than one pixel"
                    }
                },
            }
        )
    )
    with pytest.raises(PropmapsError, match="experiment=statistics") as error:
        claims_json.claim(str(folder), "centre_concentration")
    assert "more than one pixel" in str(error.value)
    with pytest.raises(PropmapsError, match="no claim"):
        claims_json.claim(str(folder), "not_a_claim")


def test_claims_provenance_from_git_and_the_run_folder(tmp_path):
    committed, _ = claims_json.rules_committed()
    assert committed and datetime.datetime.fromisoformat(committed).tzinfo
    # A committed run: its attack.csv was in git before the rules' last commit.
    run = os.path.join(ROOT, "docs", "results", "lenet_1000_cpu")
    prov = claims_json.run_provenance(
        os.path.join(run, "attack.csv"), str(tmp_path), time.time()
    )
    assert prov["status"] == "retrospective"
    first_seen, rules = (
        datetime.datetime.fromisoformat(prov[k])
        for k in ("numbers_first_seen", "rules_committed")
    )
    assert first_seen < rules
    # A copy of it elsewhere (new modification time): git knows its content.
    copy = tmp_path / "copy"
    copy.mkdir()
    shutil.copy(os.path.join(run, "attack.csv"), copy / "attack.csv")
    again = claims_json.run_provenance(str(copy / "attack.csv"), str(copy), time.time())
    assert again["status"] == "retrospective"
    assert again["numbers_first_seen"] == prov["numbers_first_seen"]
    # An untracked run: the earliest of its files' times, an earlier claims file's
    # recorded date and the start of this computation.
    csv_path = tmp_path / "attack.csv"
    csv_path.write_text("index\n")
    os.utime(csv_path, (1.7e9, 1.7e9))  # 2023-11-14
    seen = claims_json.numbers_first_seen(str(csv_path), str(tmp_path), time.time())
    assert seen.startswith("2023-11-14")
    (tmp_path / "claims.json").write_text(
        json.dumps({"provenance": {"numbers_first_seen": "2020-01-01T00:00:00+00:00"}})
    )
    seen = claims_json.numbers_first_seen(str(csv_path), str(tmp_path), time.time())
    assert seen == "2020-01-01T00:00:00+00:00"
