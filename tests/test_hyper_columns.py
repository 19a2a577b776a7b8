"""csrc/hyper_columns.h declares the hyperparameter table's columns that lamb_kernels/hyper_table.py
declares (LambColumn, LarsColumn, WIDTH): the C++ and CUDA kernels read the table the Python side
writes, so a column that moved in one and not the other would feed them the wrong hyperparameter.

The header is read as text, so this runs without the C++ build. Every enumerator of the header is
checked, by name and value and in order, and the header must say nothing the check cannot read: an
enumerator without an explicit decimal value, another enum, or a kLamb/kLars name outside the two
enums fails the test instead of being passed over."""
import re

from lamb_kernels import extension
from lamb_kernels.hyper_table import WIDTH, LambColumn, LarsColumn

HEADER = extension.CSRC / "hyper_columns.h"
PREFIXES = {LambColumn: "kLamb", LarsColumn: "kLars"}
ENUM = r"\benum\b([^{;]*)\{([^}]*)\}\s*;"  # an enum's declaration and body


def without_comments(text: str) -> str:
    return re.sub(r"//[^\n]*", "", re.sub(r"/\*.*?\*/", " ", text, flags=re.S))


def cpp_name(prefix: str, python_name: str) -> str:
    """A Python column name as the header spells it: ONE_MINUS_BETA2 -> kLambOneMinusBeta2."""
    return prefix + "".join(part.capitalize() for part in python_name.split("_"))


def expected_enum(columns) -> list:
    """The header's enumerators for the Python enum `columns`: every member (aliases included), in
    declaration order, then the table's width as k<Prefix>Columns."""
    prefix = PREFIXES[columns]
    members = [(cpp_name(prefix, name), int(member)) for name, member in columns.__members__.items()]
    return [*members, (prefix + "Columns", WIDTH)]


def header_mismatch(text: str) -> str | None:
    """Why the header `text` does not declare the Python columns, or None when it does."""
    code = without_comments(text)
    enums = {}
    for match in re.finditer(ENUM, code):
        declaration = re.fullmatch(r"\s*(\w+)\s*:\s*int\s*", match[1])
        if not declaration:
            return f"an enum declared as {match[1].strip()!r}, not as 'Name : int'"
        entries = []
        for entry in filter(None, (part.strip() for part in match[2].split(","))):
            parsed = re.fullmatch(r"(k\w+)\s*=\s*(\d+)", entry)
            if not parsed:
                return f"{declaration[1]}'s enumerator {entry!r} is not written 'kName = <decimal value>'"
            entries.append((parsed[1], int(parsed[2])))
        if declaration[1] in enums:
            return f"two enums named {declaration[1]}"
        enums[declaration[1]] = entries
    rest = re.sub(ENUM, "", code)
    if re.search(r"\benum\b|\bk(Lamb|Lars)\w*", rest):
        return "an enum or a kLamb/kLars name outside the two column enums"
    for columns in PREFIXES:
        declared, expected = enums.pop(columns.__name__, None), expected_enum(columns)
        if declared != expected:
            return f"{columns.__name__}: the header has {declared}, Python {expected}"
    return f"enums Python does not declare: {sorted(enums)}" if enums else None


def test_the_python_columns_are_distinct_and_fit_the_table():
    for columns in PREFIXES:
        values = [int(member) for member in columns.__members__.values()]
        assert len(set(values)) == len(values) and all(0 <= value < WIDTH for value in values), (columns, values)


def test_every_enumerator_of_the_header_matches_python():
    assert header_mismatch(HEADER.read_text()) is None, header_mismatch(HEADER.read_text())


def test_the_check_fails_when_the_header_drifts():
    """Each kind of drift the check must catch, made on a copy of the header's text."""
    text = HEADER.read_text()
    drifts = [
        ("kLambEps = 5", "kLambEps = 6"),  # a value
        ("kLarsTrustClip = 6", "kLarsTrustClipping = 6"),  # a name
        ("kLambColumns = 16", "kLambColumns = 17"),  # the width
        ("  kLarsKeyHi = 12,", "  kLarsKeyHi = 12,\n  kLarsExtra = 13,"),  # a column Python lacks
        ("  kLambKeyHi = 15,", ""),  # a column the header lacks
        ("kLambBc2 = 9", "kLambBc2"),  # an implicit value
        ("kLarsEps = 5", "kLarsEps = 0x5"),  # a value written another way
        ("enum LarsColumn : int", "enum LarsColumn"),  # another declaration
        ("}  // namespace", "constexpr int kLambExtra = 16;\n}  // namespace"),  # a column outside the enums
        ("}  // namespace", "enum Other : int { kOther = 0 };\n}  // namespace"),  # an enum Python lacks
    ]
    for old, new in drifts:
        assert old in text, old
        assert header_mismatch(text.replace(old, new)) is not None, (old, new)
