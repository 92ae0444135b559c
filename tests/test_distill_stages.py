"""Recipe validation: every problem is reported before anything heavy runs, unknown keys with the closest
known key, bad paths, impossible lengths and batch splits, misplaced options; the shipped recipes parse."""
from pathlib import Path

import pytest

from hylo_lab.distill.stages import RecipeError, StageSpec, load_recipe, recipe_from_dict

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def model_dir(tmp_path):
    d = tmp_path / "base"
    d.mkdir()
    (d / "config.json").write_text("{}")
    (tmp_path / "train.txt").write_text("\n\n".join(f"document {i} " * 20 for i in range(50)))
    (tmp_path / "heldout.txt").write_text("\n\n".join(f"held {i} " * 20 for i in range(5)))
    return d


def good(tmp_path, model_dir, **changes):
    raw = dict(
        name="t", output_dir=str(tmp_path / "out"), base=str(model_dir),
        student=dict(layout="1MLA1GDN", mla_layers=[1]),
        data=dict(train=[dict(type="text", path=str(tmp_path / "train.txt"), separator="\n\n")],
                  heldout=[dict(type="text", path=str(tmp_path / "heldout.txt"), separator="\n\n")]),
        train=dict(batch_size=4, eval_rows=2),
        stages=[dict(name="ild", kind="ild", seq_len=64, steps=3, lr=1e-3),
                dict(name="kd", kind="kd", seq_len=64, tokens="1e4", lr="6e-5",
                     yarn=dict(factor=2, original_max_position_embeddings=64))],
    )
    raw.update(changes)
    return raw


def errors_of(raw) -> str:
    with pytest.raises(RecipeError) as info:
        recipe_from_dict(raw)
    return str(info.value)


def test_a_good_recipe_builds_and_yaml_exponents_become_numbers(tmp_path, model_dir):
    r = recipe_from_dict(good(tmp_path, model_dir))
    kd = r.stages[1]
    assert kd.lr == 6e-5 and kd.tokens == 1e4 and kd.yarn.factor == 2
    assert kd.num_steps(4) == 40  # ceil(1e4 / (4 x 64))
    assert r.stages[0].num_steps(4) == 3
    assert kd.yarn.rope_parameters(500000.0) == dict(rope_type="yarn", rope_theta=500000.0, factor=2.0,
                                                    original_max_position_embeddings=64)
    assert r.to_dict()["stages"][1]["kl"] == "full"


def test_unknown_keys_get_a_suggestion(tmp_path, model_dir):
    raw = good(tmp_path, model_dir, trian=dict(batch_size=4))
    raw["stages"][0]["learning_rate"] = 1e-3
    raw["stages"][1]["yarn"]["factr"] = 2
    raw["data"]["train"][0]["seperator"] = "\n"
    msg = errors_of(raw)
    assert "recipe: unknown key 'trian' (did you mean 'train'?)" in msg
    assert "stages[0] (ild): unknown key 'learning_rate'" in msg
    assert "stages[1] (kd).yarn: unknown key 'factr' (did you mean 'factor'?)" in msg
    assert "data.train[0]: unknown key 'seperator' (did you mean 'separator'?)" in msg


@pytest.mark.parametrize("change, message", [
    (dict(stages=[]), "stages: required, a non-empty list"),
    (dict(base="/nonexistent/model"), "base: '/nonexistent/model' is not an existing directory"),
    (dict(base="toy:llama-xxl"), "unknown toy teacher 'llama-xxl'"),
    (dict(data=dict(train=[dict(type="text", path="/nonexistent/*.txt")])), "no text file matches"),
    (dict(data=dict(train=[])), "data.train: at least one source is needed"),
    (dict(student=dict()), "student: give a layout"),
    (dict(student=dict(layout="1MLA1GDN", upcycle=dict(rope_int="random"))),
     "unknown option 'rope_int' (did you mean 'rope_init'?)"),
    (dict(train=dict(batch_size=6, micro_batch_size=4)), "batch_size=6 is not a multiple of micro_batch_size=4"),
    (dict(train=dict(precision="fp16")), "train.precision='fp16'"),
    (dict(train=dict(eval_rows=100)), "train.eval_rows=100 rows of 64 tokens need more than the held-out data holds"),
])
def test_bad_recipes_are_refused_with_a_clear_message(tmp_path, model_dir, change, message):
    assert message in errors_of(good(tmp_path, model_dir, **change))


def test_stage_problems(tmp_path, model_dir):
    stages = [
        dict(name="kd", kind="kd", seq_len=100000, steps=3),  # longer than the data
        dict(name="ild", kind="ild", seq_len=64, steps=3, tokens=100, kl="hidden",  # after kd; steps+tokens; kl on ild
             yarn=dict(factor=2, original_max_position_embeddings=64)),
        dict(name="kd", kind="distill", seq_len=1, steps=0, lr=0, warmup=1.5, batch_size=3, micro_batch_size=2),
        dict(name="x", kind="kd", seq_len=64, steps=2, kl="sparse", direction="sideways", ce_weight=0, kl_weight=0),
    ]
    msg = errors_of(good(tmp_path, model_dir, stages=stages))
    for part in [
        "stages: name 'kd' is used twice",
        "stages[1] (ild): an ild stage must come before every kd stage",
        "stages[1] (ild): give exactly one of steps or tokens",
        "stages[1] (ild): ['yarn', 'kl'] apply to kd stages only",
        "stages[2] (kd): kind='distill'",
        "stages[2] (kd).seq_len=1 must be >= 2",
        "stages[2] (kd).steps=0 must be >= 1",
        "stages[2] (kd).lr=0 must be > 0",
        "stages[2] (kd).warmup=1.5 must be < 1",
        "stages[2] (kd): batch_size=3 is not a multiple of micro_batch_size=2",
        "stages[3] (x): kl='sparse'",
        "stages[3] (x): direction='sideways'",
        "stages[3] (x): kl_weight and ce_weight are both 0",
    ]:
        assert part in msg, part
    only_length = errors_of(good(tmp_path, model_dir, stages=stages[:1]))
    assert "seq_len=100000 is longer than the training data can provide" in only_length


def test_ild_cannot_start_from_a_finished_model(tmp_path, model_dir):
    msg = errors_of(good(tmp_path, model_dir, student=dict(init=str(model_dir))))
    assert "cannot start from student.init" in msg


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(RecipeError, match="not found"):
        load_recipe(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("stages: [\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(tmp_path / "bad.yaml")


def test_stage_defaults_follow_the_paper():
    st = StageSpec(name="kd", kind="kd", seq_len=8192, steps=1)
    assert (st.direction, st.temperature, st.ce_weight, st.kl_weight) == ("forward", 1.0, 0.0, 1.0)


@pytest.mark.parametrize("name", ["llama3.2-1b-4mla12gdn-8k.yaml", "llama3.2-1b-4mla12gdn-64k.yaml"])
def test_paper_recipes_validate_once_their_paths_exist(name, tmp_path, monkeypatch):
    monkeypatch.delenv("HYLO_MODELS", raising=False)
    with pytest.raises(RecipeError, match="environment variable HYLO_MODELS is not set"):
        load_recipe(REPO / "recipes" / name)
    for model in ("Llama-3.2-1B", "Llama-3.1-8B-Instruct"):
        (tmp_path / "models" / model).mkdir(parents=True)
        (tmp_path / "models" / model / "config.json").write_text("{}")
    for part in ("sft", "math", "long_sft"):
        (tmp_path / "data" / part).mkdir(parents=True)
        (tmp_path / "data" / part / "a.jsonl").write_text('{"messages": []}\n' * 10**4)
    (tmp_path / "data" / "heldout.jsonl").write_text('{"messages": []}\n' * 10**5)
    monkeypatch.setenv("HYLO_MODELS", str(tmp_path / "models"))
    monkeypatch.setenv("HYLO_DATA", str(tmp_path / "data"))
    recipe = load_recipe(REPO / "recipes" / name)
    ild, kd = recipe.stages
    assert (ild.kind, ild.seq_len, ild.lr, kd.kind, kd.lr, kd.direction) == ("ild", 2048, 2e-4, "kd", 6e-5, "forward")
    assert recipe.student.preset == "llama3.2-1b/4MLA12GDN"
    assert kd.yarn.original_max_position_embeddings == 2048 and kd.yarn.factor == {8192: 4, 65536: 32}[kd.seq_len]


def test_toy_recipe_validates():
    recipe = load_recipe(REPO / "recipes" / "toy.yaml")
    assert recipe.uses_toy() and [s.kind for s in recipe.stages] == ["ild", "kd", "kd"]
