import pandas as pd
import pytest

from rectune.models.dataset import build_dataset
from rectune.models.errors import DataError, GroupError
from rectune.models.groups import make_groups
from rectune.models.splits import SplitStrategy

# The datasets here hold train rows only, which loading warns about; grouping does not care.
pytestmark = pytest.mark.filterwarnings("ignore:.*no (validation|test) rows:rectune.models.errors.RectuneWarning")


def dataset_with(users: list[str], counts: list[int], attributes: pd.DataFrame | None = None):
    rows = [(u, f"i{j}") for u, n in zip(users, counts) for j in range(n)]
    frame = pd.DataFrame(rows, columns=["user", "item"])
    frame["split"] = "train"
    return build_dataset("t", frame, source="t", split=SplitStrategy("given"), user_attributes=attributes)


def test_prefix_groups_keep_frequent_prefixes_and_pool_the_rest():
    users = ["AE1", "AE2", "AF1", "AF2", "AG1", "AH1", "AH2", "AH3", "B11"]
    groups = make_groups(dataset_with(users, [1] * len(users)), "prefix")
    assert groups.sizes() == {"AE": 2, "AF": 2, "AH": 3, "other": 2}
    assert groups.members("other").tolist() == [4, 8]  # AG1 and B11
    exact = make_groups(dataset_with(users[:8], [1] * 8), "prefix")
    assert exact.sizes() == {"AE": 2, "AF": 2, "AG": 1, "AH": 3}
    assert make_groups(dataset_with(users, [1] * len(users)), "prefix:1").sizes() == {"A": 8, "B": 1}


def test_activity_groups_keep_ties_together():
    counts = [1, 1, 1, 1, 2, 2, 3, 4, 8, 9]
    groups = make_groups(dataset_with([f"u{i}" for i in range(10)], counts), "activity")
    codes = groups.codes
    assert len(set(codes[:4])) == 1  # all users with one interaction share a group
    assert groups.labels[0] == "cold" and groups.labels[-1] == "heavy"
    assert codes[-1] == len(groups.labels) - 1
    assert groups.descriptions["cold"] == "1 train interactions"


def test_age_bands_and_empty_band_refused():
    attributes = pd.DataFrame({"age": [10, 20, 40, 60]}, index=["a", "b", "c", "d"])
    groups = make_groups(dataset_with(list("abcd"), [1] * 4, attributes), "age")
    assert groups.sizes() == {"children": 1, "young": 1, "middle-aged": 1, "elderly": 1}
    no_children = pd.DataFrame({"age": [20, 20, 40, 60]}, index=list("abcd"))
    with pytest.raises(GroupError, match="children"):
        make_groups(dataset_with(list("abcd"), [1] * 4, no_children), "age")


def test_bad_specs_name_the_problem(tmp_path):
    dataset = dataset_with(["a", "b"], [1, 1])
    with pytest.raises(GroupError, match="unknown group spec 'region'"):
        make_groups(dataset, "region")
    with pytest.raises(GroupError, match="needs the user attribute 'gender'"):
        make_groups(dataset, "gender")
    with pytest.raises(GroupError, match="must be an integer"):
        make_groups(dataset, "activity:x")
    bad = tmp_path / "groups.csv"
    bad.write_text("user,label\na,x\n")
    with pytest.raises(DataError, match="missing column"):
        make_groups(dataset, f"file:{bad}")


def test_file_groups_mark_missing_users_unassigned(tmp_path):
    path = tmp_path / "groups.csv"
    path.write_text("user_id,group\na,north\n")
    groups = make_groups(dataset_with(["a", "b"], [1, 1]), f"file:{path}")
    assert groups.sizes() == {"north": 1, "unassigned": 1}
    assert groups.members("north").tolist() == [0]


def test_categorical_attribute_groups_name_every_value():
    attributes = pd.DataFrame({
        "gender": ["F", "M", "F", "M", "F"],
        "occupation": ["writer", "artist", "writer", "doctor", "artist"],
        "region": ["north", "south", "south", "south", "east"],
    }, index=list("abcde"))
    dataset = dataset_with(list("abcde"), [1] * 5, attributes)
    gender = make_groups(dataset, "gender")
    assert gender.labels == ("F", "M") and gender.sizes() == {"F": 3, "M": 2}
    assert gender.members("F").tolist() == [0, 2, 4]
    occupation = make_groups(dataset, "occupation")
    assert occupation.sizes() == {"artist": 2, "doctor": 1, "writer": 2}
    assert occupation.members("doctor").tolist() == [3]
    region = make_groups(dataset, "attr:region")
    assert region.spec == "attr:region" and region.sizes() == {"east": 1, "north": 1, "south": 3}
    with pytest.raises(GroupError, match=r"needs the user attribute 'zip'.*\['gender', 'occupation', 'region'\]"):
        make_groups(dataset, "attr:zip")


def test_users_without_attributes_form_an_unknown_group():
    # User "d" rated items but has no attribute row (a rater missing from u.user).
    attributes = pd.DataFrame({"age": [10, 20, 40, 60, 30], "gender": ["F", "M", "F", "M", "M"]}, index=list("abcef"))
    with pytest.warns(RuntimeWarning, match="1 of 6 users have no row"):
        dataset = dataset_with(list("abcdef"), [1] * 6, attributes)
    age = make_groups(dataset, "age")
    assert age.sizes() == {"children": 1, "young": 2, "middle-aged": 1, "elderly": 1, "unknown": 1}
    assert age.members("unknown").tolist() == [3]
    assert "no age on record" in age.descriptions["unknown"]
    assert make_groups(dataset, "gender").sizes() == {"F": 2, "M": 3, "unknown": 1}
    # With every age known there is no unknown band.
    assert "unknown" not in make_groups(dataset_with(list("abcef"), [1] * 5, attributes), "age").labels


def test_age_groups_refuse_ages_that_are_not_numbers():
    attributes = pd.DataFrame({"age": ["10", "twenty", "40", "-5"]}, index=list("abcd"))
    with pytest.raises(GroupError, match=r"non-negative numeric ages, but 2 user\(s\) have other values, e.g. user 'b' has age 'twenty'"):
        make_groups(dataset_with(list("abcd"), [1] * 4, attributes), "age")


@pytest.mark.parametrize("label, problem", [
    ("x" * 230, "is 230 characters long; labels name MLflow metrics and may hold at most 100"),
    ("north|south", "holds '|'"),
    ("two\nlines", "holds '\\n'"),
    ("it's", "holds \"'\""),
    ('say "hi"', "holds '\"'"),
    ("  ", "blank label"),
])
def test_unsafe_group_labels_are_refused_naming_the_label(tmp_path, label, problem):
    path = tmp_path / "groups.csv"
    pd.DataFrame({"user_id": ["a", "b"], "group": [label, "fine"]}).to_csv(path, index=False)
    with pytest.raises(GroupError) as error:
        make_groups(dataset_with(["a", "b"], [1, 1]), f"file:{path}")
    message = str(error.value)
    assert problem in message and str(path) in message
    shown = repr(label if len(label) <= 60 else label[:60] + "…")
    assert "blank" in problem or shown in message
    assert "\n" not in message


def test_labels_at_the_length_limit_pass(tmp_path):
    from rectune.models.groups import MAX_LABEL_LENGTH

    path = tmp_path / "groups.csv"
    long = "a-b c.d_" * (MAX_LABEL_LENGTH // 8) + "x" * (MAX_LABEL_LENGTH % 8)
    pd.DataFrame({"user_id": ["a", "b"], "group": [long, "Baby & Toddler"]}).to_csv(path, index=False)
    assert make_groups(dataset_with(["a", "b"], [1, 1]), f"file:{path}").sizes() == {"Baby & Toddler": 1, long: 1}
