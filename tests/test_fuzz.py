"""Short fuzz runs (hypothesis): untrusted bytes end in success or an AdaptermixError subclass, nothing
outside the library is touched (benchmarks/reliability.py runs the long ones)."""

from adaptermix.reliability.fuzz import fuzz_cli, fuzz_library, fuzz_peft, fuzz_safetensors


def test_fuzz_the_safetensors_reader():
    assert fuzz_safetensors(400) >= 400


def test_fuzz_the_peft_loader(tmp_path):
    counts = fuzz_peft(tmp_path, config_examples=60, weight_examples=60)
    assert counts["peft_config"] >= 60 and counts["peft_weights"] >= 60


def test_fuzz_opening_hostile_libraries(tmp_path):
    counts = fuzz_library(tmp_path, examples=25)
    assert counts["library"] >= 25 and counts["outside_touched"] == 0


def test_fuzz_the_cli_arguments(tmp_path):
    counts = fuzz_cli(tmp_path, examples=12)
    assert counts["cli"] >= 12 and counts["cli_outside_touched"] == 0


def test_a_non_string_dtype_is_a_format_error():
    """Found by the long fuzz run: a list as dtype raised TypeError (unhashable) instead of a clear error."""
    import json

    import pytest

    from adaptermix.library.errors import AdapterFormatError
    from adaptermix.library.tensor_file import parse_safetensors

    header = json.dumps({"t": {"dtype": ["F32"], "shape": [1], "data_offsets": [0, 4]}}).encode()
    with pytest.raises(AdapterFormatError, match="no supported dtype"):
        parse_safetensors(bytearray(len(header).to_bytes(8, "little") + header + bytes(4)))


def test_a_bad_pattern_in_a_peft_config_is_a_format_error(tmp_path):
    """Found by the long fuzz run: an invalid regex in alpha_pattern raised re.error."""
    import json

    import pytest

    from adaptermix.library.errors import AdapterFormatError
    from adaptermix.library.peft_format import load_peft_adapter
    from adaptermix.reliability.fuzz import _peft_checkpoint

    folder = _peft_checkpoint(tmp_path / "ckpt")
    config = json.loads((folder / "adapter_config.json").read_text())
    for patterns, message in (({"[": 4}, "not a regex"), ({"q_proj": None}, "must be a number")):
        (folder / "adapter_config.json").write_text(json.dumps({**config, "alpha_pattern": patterns}))
        with pytest.raises(AdapterFormatError, match=message):
            load_peft_adapter(folder)


def test_a_fuzz_case_that_hangs_is_a_finding():
    import time

    import pytest

    from adaptermix.reliability.fuzz import FuzzCaseHung, _bounded

    with pytest.raises(FuzzCaseHung, match="ran over 1 s"):
        _bounded(lambda: time.sleep(30), seconds=1)()
    assert _bounded(lambda x: x + 1, seconds=5)(1) == 2
