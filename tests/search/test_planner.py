"""The pure planner: deterministic task ids, dependencies, stages, resume from results."""

from __future__ import annotations

from selfaugment.trainer.search.planner import (
    BASE_TRANSFORMS,
    all_tasks,
    plan,
    stages,
    stages_between,
    task_by_id,
)
from selfaugment.trainer.spec import AugmentSearchSpec


def _spec(**search) -> AugmentSearchSpec:
    return AugmentSearchSpec.model_validate({"search": search})


def test_paper_defaults_give_the_full_algorithm() -> None:
    # The paper trains every base candidate; our default halves them (docs/cost.md).
    halving = [task.id for task in all_tasks(AugmentSearchSpec())]
    assert halving[0] == "base-r0-randomresizedcrop" and "base-r1-s0" in halving
    spec = _spec(base_selection={"method": "exhaustive"})
    assert (spec.search.folds, spec.search.repeats, spec.search.top_policies) == (5, 2, 10)
    assert (spec.search.trials, spec.search.sub_policies, spec.search.ops_per_sub_policy) == (
        200,
        5,
        2,
    )
    assert spec.search.objective == "minimax"
    ids = [task.id for task in all_tasks(spec)]
    assert len(BASE_TRANSFORMS) == 16
    assert ids[:2] == ["base-randomresizedcrop", "base-shearx"]
    assert ids.count("merge") == 1 and ids[-2:] == ["retrain", "report"]
    assert len([i for i in ids if i.startswith("fold-")]) == 5
    assert len([i for i in ids if i.startswith("search-")]) == 10
    assert len(ids) == len(set(ids)) == 16 + 5 + 10 + 3


def test_ids_are_deterministic() -> None:
    assert [t.to_dict() for t in all_tasks(_spec(folds=3))] == [
        t.to_dict() for t in all_tasks(_spec(folds=3))
    ]


def test_plan_walks_the_stages_in_order() -> None:
    spec = _spec(folds=2, repeats=1, base_candidates=["Rotate", "RandomResizedCrop"])
    state = plan(spec, set())
    assert state.stage == "base"
    assert [t.id for t in state.ready] == ["base-rotate", "base-randomresizedcrop"]
    done = {"base-rotate", "base-randomresizedcrop"}
    state = plan(spec, done)
    assert state.stage == "folds" and [t.id for t in state.ready] == ["fold-0", "fold-1"]
    # search of fold 0 waits for every fold: the minimax objective normalises over folds
    state = plan(spec, done | {"fold-0"})
    assert [t.id for t in state.ready] == ["fold-1"]
    done |= {"fold-0", "fold-1"}
    state = plan(spec, done)
    assert state.stage == "search" and [t.id for t in state.ready] == [
        "search-f0-r0",
        "search-f1-r0",
    ]
    done |= {"search-f0-r0", "search-f1-r0", "merge", "retrain"}
    state = plan(spec, done)
    assert state.stage == "report" and [t.id for t in state.ready] == ["report"]
    state = plan(spec, done | {"report", "unknown-task"})
    assert state.finished and state.stage == "done" and state.percent == 100.0
    assert "unknown-task" not in state.done


def test_given_base_policy_skips_the_base_stage() -> None:
    spec = _spec(base_policy="RandomResizedCrop", folds=2)
    state = plan(spec, set())
    assert state.stage == "folds"
    assert not any(task.kind == "base" for task in state.tasks)


def test_selfrandaugment_plans_a_grid() -> None:
    spec = _spec(algorithm="selfrandaugment", randaugment={"n": [1, 2], "m": [5, 9]})
    ids = [task.id for task in all_tasks(spec)]
    assert ids == [
        "randaugment-n1-m5",
        "randaugment-n1-m9",
        "randaugment-n2-m5",
        "randaugment-n2-m9",
        "retrain",
        "report",
    ]
    assert task_by_id(spec, "randaugment-n2-m9").params == {"n": 2, "m": 9}


def test_stages_between_lists_stages_passed_unobserved() -> None:
    spec = _spec()
    assert stages_between(spec, "search", "retrain") == ["merge"]
    assert stages_between(spec, "folds", "search") == []
    assert stages_between(spec, "search", "done") == ["merge", "retrain", "report"]
    assert stages_between(spec, None, "folds") == []
    rand = _spec(algorithm="selfrandaugment")
    assert stages_between(rand, "randaugment", "report") == ["retrain"]


def test_a_source_read_from_files_is_prepared_first() -> None:
    folder = AugmentSearchSpec.model_validate(
        {"dataset": {"uri": "s3://data/pets"}, "search": {"base_policy": "Rotate", "folds": 2}}
    )
    tasks = all_tasks(folder)
    assert (tasks[0].id, tasks[0].kind, tasks[0].depends_on) == ("prepare", "prepare", ())
    assert all("prepare" in task.depends_on for task in tasks[1:])
    state = plan(folder, set())
    assert state.stage == "prepare" and [task.id for task in state.ready] == ["prepare"]
    state = plan(folder, {"prepare"})
    assert state.stage == "folds" and [task.id for task in state.ready] == ["fold-0", "fold-1"]
    assert stages(folder)[:2] == ("prepare", "base") and stages(AugmentSearchSpec())[0] == "base"
    builtin = AugmentSearchSpec.model_validate({"search": {"base_policy": "Rotate", "folds": 2}})
    assert builtin.dataset.uri.startswith("sklearn:")  # loaded directly: nothing to prepare
    assert [task.id for task in all_tasks(builtin)] == [task.id for task in tasks[1:]]
