"""errors.read_yaml_mapping: a user's YAML file (recipe, sweep) read with one-line errors of the caller's type."""

import pytest

from hylo_lab.distill.recipe_check import RecipeError
from hylo_lab.distill.stages import read_recipe
from hylo_lab.errors import UserError, read_yaml_mapping
from hylo_lab.sweep import SweepError, load_sweep


@pytest.mark.parametrize("text, message", [
    (None, "not found; check the path"),
    ("a: b: c\n", "is not valid YAML: line 1, column 5: mapping values are not allowed here"),
    ("", "is empty; it should be a mapping"),
    ("- 1\n- 2\n", "holds a list; it should be a mapping"),
])
def test_a_bad_file_is_one_line_of_the_callers_error(tmp_path, text, message):
    path = tmp_path / "x.yaml"
    if text is not None:
        path.write_text(text)
    for read, error, what in ((read_recipe, RecipeError, "recipe file"), (load_sweep, SweepError, "sweep file")):
        with pytest.raises(error) as info:
            read(path)
        assert str(info.value).startswith(f"{what} {path} {message}") and "\n" not in str(info.value)


def test_a_mapping_is_returned_and_a_list_told_the_expected_keys(tmp_path):
    path = tmp_path / "x.yaml"
    path.write_text("a: 1\nb: [2, 3]\n")
    assert read_yaml_mapping(path, "thing") == {"a": 1, "b": [2, 3]}
    path.write_text("[a, b]\n")
    with pytest.raises(UserError, match=r"^thing .* holds a list; it should be a mapping with keys a, b$"):
        read_yaml_mapping(path, "thing", keys=("a", "b"))
