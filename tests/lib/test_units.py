"""Sizes and shares are read and printed in the forms people write."""

import math

import pytest

import fracgpu
from fracgpu import _native, units

KiB, MiB, GiB, TiB = 1 << 10, 1 << 20, 1 << 30, 1 << 40


@pytest.mark.parametrize(
    "text, expected",
    [
        ("512MiB", 512 * MiB),
        ("4GiB", 4 * GiB),
        ("4G", 4 * GiB),  # docker's convention: single letters are binary
        ("4g", 4 * GiB),
        ("4gib", 4 * GiB),
        ("4GB", 4_000_000_000),
        ("4gb", 4_000_000_000),
        ("1048576", 1048576),
        ("1048576B", 1048576),
        ("1.5GiB", 1610612736),
        ("1K", KiB),
        ("1KiB", KiB),
        ("1KB", 1000),
        ("1M", MiB),
        ("1MB", 1_000_000),
        ("2T", 2 * TiB),
        ("2TiB", 2 * TiB),
        ("2TB", 2_000_000_000_000),
        ("4Gi", 4 * GiB),  # Kubernetes' suffixes, as a pod's resources are written
        ("512Mi", 512 * MiB),
        ("64Ki", 64 * KiB),
        ("1Ti", TiB),
        ("4gi", 4 * GiB),
        ("  4 GiB\t", 4 * GiB),
        ("0.5KiB", 512),
        ("0.1KB", 100),  # exact decimal arithmetic, no 99.99999 from binary floats
        ("0.3KB", 300),
        ("1.9", 1),  # rounds down to a whole byte
        ("1.0009KiB", 1024),  # 1024.92 bytes, rounded down
        ("007MiB", 7 * MiB),
        ("9223372036854775807", 2**63 - 1),
        ("8388607.999TiB", 8388607 * TiB + 999 * TiB // 1000),
    ],
)
def test_sizes_parse_to_bytes(text, expected):
    assert _native.parse_size(text) == (expected, 0.0)
    assert units.parse_size(text) == expected
    assert fracgpu.parse_size(text) == expected


@pytest.mark.parametrize(
    "text, fraction",
    [("25%", 0.25), ("100%", 1.0), ("12.5%", 0.125), ("10%", 0.1), (" 50 % ", 0.5), ("0.01%", 0.0001)],
)
def test_a_percentage_is_a_fraction_of_the_device(text, fraction):
    assert _native.parse_size(text) == (0, fraction)
    assert units.parse_size(text, device_total=80 * GiB) == math.floor(fraction * 80 * GiB)


def test_a_percentage_needs_the_device_size():
    with pytest.raises(ValueError, match="a percentage of the device needs the device's memory size"):
        units.parse_size("25%")


def test_a_percentage_rounds_down_to_whole_bytes():
    assert units.parse_size("50%", device_total=1001) == 500
    with pytest.raises(ValueError, match="less than one byte"):
        units.parse_size("0.01%", device_total=100)


@pytest.mark.parametrize(
    "text, problem",
    [
        ("", "empty"),
        ("   ", "empty"),
        ("-1GiB", "negative"),
        ("-0", "negative"),
        ("0", "zero"),
        ("0.0GiB", "zero"),
        ("0B", "zero"),
        ("0%", "zero"),
        ("0.4", "rounds down to 0 bytes"),
        ("nan", "does not start with a number"),
        ("inf", "does not start with a number"),
        ("infinity", "does not start with a number"),
        ("0x10", "hexadecimal"),
        ("0x10MiB", "hexadecimal"),
        ("GiB", "does not start with a number"),
        ("+4GiB", "does not start with a number"),
        (".5GiB", "does not start with a number"),
        ("4.GiB", "decimal point"),
        ("1e9", "unknown unit 'e9'"),
        ("12XB", "unknown unit 'XB'"),
        ("4Pi", "unknown unit 'Pi'"),
        ("4 PiB", "unknown unit 'PiB'"),
        ("4 G B", "text after the unit"),
        ("4GiB junk", "text after the unit"),
        ("4GiB\n5", "text after the unit"),
        ("101%", "more than 100%"),
        ("100.5%", "more than 100%"),
        ("9223372036854775808", "too large"),
        ("8388608TiB", "too large"),
        ("99999999999999999999999GiB", "too large"),
    ],
)
@pytest.mark.fault('Bad sizes: negative, overflow, unknown units, NaN, empty',
                   'rejected with the problem and the accepted forms')
def test_bad_sizes_are_rejected_with_the_problem_and_the_accepted_forms(text, problem):
    with pytest.raises(ValueError) as error:
        units.parse_size(text)
    message = str(error.value)
    assert problem in message
    assert "invalid size" in message
    for form in ("512MiB", "4GiB", "4GB", "25%", "1048576"):
        assert form in message
    assert "\n" not in message


def test_a_message_shows_the_input_safely():
    with pytest.raises(ValueError) as error:
        units.parse_size("5\x1b[31m")
    assert "\x1b" not in str(error.value)
    with pytest.raises(ValueError) as error:
        units.parse_size("9" * 100 + "XB")
    assert "..." in str(error.value) and len(str(error.value)) < 400


def test_an_embedded_nul_is_not_cut_short():
    with pytest.raises(ValueError, match="NUL"):
        _native.parse_size("1GiB\0junk")
    with pytest.raises(ValueError, match="NUL"):
        _native.parse_share("25%\0junk")


def test_int_sizes_pass_through():
    assert units.parse_size(4096) == 4096
    for bad in (0, -1, 2**63):
        with pytest.raises(ValueError):
            units.parse_size(bad)
    for bad in (True, 1.5, None, b"4GiB"):
        with pytest.raises(TypeError):
            units.parse_size(bad)


def test_zero_only_where_allowed():
    for zero in ("0", "0B", "0.0", "0 MiB", 0):
        assert units.parse_size(zero, allow_zero=True) == 0
        with pytest.raises(ValueError):
            units.parse_size(zero)
    with pytest.raises(ValueError, match="unknown unit"):
        units.parse_size("0 QB", allow_zero=True)
    with pytest.raises(ValueError, match="negative"):
        units.parse_size("-0", allow_zero=True)


@pytest.mark.parametrize(
    "text, share",
    [("25%", 0.25), ("0.25", 0.25), ("100%", 1.0), ("1", 1.0), ("1.0", 1.0), ("12.5%", 0.125),
     ("0.1", 0.1), ("10%", 0.1), (" 0.5 ", 0.5), ("33.3%", 0.333)],
)
def test_shares_parse_to_fractions(text, share):
    assert _native.parse_share(text) == share
    assert units.parse_share(text) == share


@pytest.mark.parametrize("text", ["25", "1.5", "100", "1.0000000000000000001"])
def test_a_bare_number_above_one_says_both_ways_to_write_it(text):
    with pytest.raises(ValueError) as error:
        units.parse_share(text)
    value = float(text)
    assert f"write {text}% or {value / 100:g}" in str(error.value)


@pytest.mark.parametrize(
    "text, problem",
    [
        ("", "empty"),
        ("0", "zero"),
        ("0%", "zero"),
        ("0.0", "zero"),
        ("-0.25", "negative"),
        ("101%", "more than 100%"),
        ("150", "at most 1"),
        ("nan", "does not start with a number"),
        ("inf", "does not start with a number"),
        ("0x1", "hexadecimal"),
        ("25 percent", "unknown unit 'percent'"),
        ("0.5GiB", "unknown unit 'GiB'"),
        ("25%%", "unknown unit '%%'"),
        ("25% x", "text after the unit"),
        ("0.0000000000000000001", "too small"),
    ],
)
@pytest.mark.fault('Bad shares: 0, over 100%, negative, malformed',
                   'rejected with the accepted forms')
def test_bad_shares_are_rejected_with_the_accepted_forms(text, problem):
    with pytest.raises(ValueError) as error:
        units.parse_share(text)
    message = str(error.value)
    assert problem in message
    assert "25%" in message and "0.25" in message


def test_number_shares_pass_through():
    assert units.parse_share(0.25) == 0.25
    assert units.parse_share(1.0) == 1.0
    with pytest.raises(ValueError, match="write 25% or 0.25"):
        units.parse_share(25.0)
    for bad in (0.0, -0.5, math.nan, math.inf, 101.0):
        with pytest.raises(ValueError):
            units.parse_share(bad)
    with pytest.raises(TypeError):
        units.parse_share(True)


@pytest.mark.parametrize(
    "size, text",
    [
        (0, "0B"),
        (1, "1B"),
        (1000, "1000B"),
        (1023, "1023B"),
        (1024, "1KiB"),
        (1536, "1.5KiB"),
        (268435456, "256MiB"),
        (1610612736, "1.5GiB"),
        (4 * GiB, "4GiB"),
        (4_000_000_000, "3.73GiB"),
        (GiB - 1, "1GiB"),  # rounded display, carried into the next unit
        (5 * TiB, "5TiB"),
        (2048 * TiB, "2048TiB"),  # no unit above TiB: the parser has none
        (2**64 - 1, "16777216TiB"),
    ],
)
def test_sizes_are_printed_as_people_write_them(size, text):
    assert units.format_size(size) == text
    assert fracgpu.format_size(size) == text


UNIT_OF = {"B": 1, "KiB": KiB, "MiB": MiB, "GiB": GiB, "TiB": TiB}


@pytest.mark.parametrize(
    "size",
    [1, 1000, 1024, 1536, 1025, 268435456, 1610612736, 1288490188, 4_000_000_000,
     5 * TiB + TiB // 4, 5 * TiB + 1, 2**63 - TiB],
)
def test_a_printed_size_parses_back(size):
    text = units.format_size(size)
    unit = UNIT_OF[text.lstrip("0123456789.")]
    if size * 100 % unit == 0:  # two decimals hold it exactly
        assert units.parse_size(text) == size
    else:  # a rounded display: off by at most half a hundredth of the unit
        assert abs(units.parse_size(text) - size) <= unit // 200 + 1


@pytest.mark.parametrize(
    "share, text",
    [(0.25, "25%"), (0.125, "12.5%"), (1.0, "100%"), (0.0, "0%"), (1 / 3, "33.33%"), (0.1, "10%"),
     (0.0001, "0.01%"), (1.5, "150%")],
)
def test_shares_are_printed_as_percentages(share, text):
    assert units.format_share(share) == text
    assert fracgpu.format_share(share) == text


def test_printed_shares_parse_back():
    for share in (0.25, 0.125, 0.5, 1.0, 0.01, 0.0005):
        assert units.parse_share(units.format_share(share)) == pytest.approx(share)


def test_formatting_rejects_what_it_cannot_print():
    for bad in (-1, 2**64):
        with pytest.raises(ValueError):
            units.format_size(bad)
    for bad in (-0.1, math.nan, math.inf):
        with pytest.raises(ValueError):
            units.format_share(bad)


def test_build_info_says_what_the_build_had():
    info = _native.build_info()
    assert set(info) == {"have_fatbin", "cuda_header_version"}
    assert isinstance(info["have_fatbin"], bool)
    assert isinstance(info["cuda_header_version"], int) and info["cuda_header_version"] >= 12000


def test_kernels_path_is_the_fatbin_or_says_how_to_get_it():
    if _native.build_info()["have_fatbin"]:
        path = fracgpu.kernels_path()
        assert path.name == "fracgpu_kernels.fatbin" and path.is_file()
    else:
        with pytest.raises(FileNotFoundError, match="nvcc"):
            fracgpu.kernels_path()


def test_the_package_has_a_version():
    assert isinstance(fracgpu.__version__, str) and fracgpu.__version__
