"""Config files as a careless or hostile user writes them: alias bombs, keys given twice, other encodings.

Each test failed on the code before: nine levels of YAML aliases in
``layout:`` ran 42 s into a MemoryError (the error message formatted the
expanded value), ``destination`` given twice kept the last silently, and a
non-UTF-8 file failed with ``'utf-8' codec can't decode byte 0xff`` naming no file.
"""

from __future__ import annotations

import time
import tracemalloc

import pytest

from segray.cli import main as cli_main
from segray.config import ConfigError, IngestConfig, TrainConfig, load_file, shown


def alias_bomb(key: str, levels: int = 9, width: int = 9) -> str:
    """``key:`` holding ``width ** levels`` values in a few hundred bytes of YAML aliases."""
    lines = [f"l0: &l0 [{', '.join(['lol'] * width)}]"]
    for i in range(1, levels):
        lines.append(f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * width)}]")
    return "\n".join(lines) + f"\n{key}: *l{levels - 1}\n"


def shared_bomb(levels: int, width: int = 9) -> list:
    """The same in Python: a list of ``width ** levels`` leaves built from shared references."""
    value: list = ["lol"] * width
    for _ in range(levels - 1):
        value = [value] * width
    return value


@pytest.mark.parametrize("key", ["layout", "class_order"])
def test_a_yaml_alias_bomb_is_refused_before_it_expands(tmp_path, capsys, key):
    path = tmp_path / "bomb.yaml"
    path.write_text(f"source: {tmp_path}\ndestination: {tmp_path / 'out'}\n" + alias_bomb(key))
    (tmp_path / "plain.yaml").write_text("layout: ids\n")
    assert load_file(str(tmp_path / "plain.yaml")) == {"layout": "ids"}  # the imports, outside the measurement
    tracemalloc.start()
    started = time.perf_counter()
    try:
        with pytest.raises(ConfigError, match=r"bomb\.yaml, line 3, column 5: anchor &l0 refused") as raised:
            load_file(str(path))
    finally:
        seconds = time.perf_counter() - started
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert seconds < 0.5, seconds
    assert peak < 5 * 2**20, peak
    assert cli_main(["ingest", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"config file {path}, line 3" in err and "refused" in err
    assert len(str(raised.value)) < 300


def test_aliases_tags_and_anchors_are_refused_in_flags_too(tmp_path, capsys):
    for text, refused in [("a: &x 1\nb: *x\n", "anchor &x"), ("a: !!python/name:os.system x\n", "tag !!python/name:os.system"),
                          ("a: !!binary aGk=\n", "tag !!binary"), ("a: [*x]\n", "alias")]:
        path = tmp_path / "c.yaml"
        path.write_text(text)
        with pytest.raises(ConfigError, match=refused) as raised:
            load_file(str(path))
        assert str(path) in str(raised.value)
    # --model-option KEY=VALUE is parsed as YAML too.
    with pytest.raises(SystemExit):
        cli_main(["train", "--model-option", "depth=[&a [1, 1], *a]"])
    assert "anchor &a refused" in capsys.readouterr().err


def test_an_unbounded_value_is_cut_in_the_message():
    bomb = shared_bomb(levels=6)  # 531,441 leaves: its repr is 3.7 MB
    started = time.perf_counter()
    for field, make in [("layout", IngestConfig.from_dict), ("class_order", IngestConfig.from_dict)]:
        with pytest.raises(ConfigError) as raised:
            make({"source": "/tmp/s", "destination": "/tmp/d", field: bomb})
        message = str(raised.value)
        assert message.startswith(field) and "(a list of 9 items)" in message
        assert len(message) < 400, len(message)
    with pytest.raises(ConfigError) as raised:
        TrainConfig(data="/tmp/d", storage="/tmp/s", name="x" * 10**6 + "/")
    assert "(1,000,001 characters)" in str(raised.value) and len(str(raised.value)) < 400
    assert time.perf_counter() - started < 1.0
    assert shown("ok") == "'ok'" and shown([1, 2]) == "[1, 2]"


def test_a_key_given_twice_is_refused_naming_the_key_and_both_lines(tmp_path, capsys):
    path = tmp_path / "dup.yaml"
    path.write_text(f"source: {tmp_path}\ndestination: ../x\nlayout: ids\ndestination: /etc\n")
    assert cli_main(["ingest", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"config file {path}, line 4, column 1: key 'destination' is given twice (first on line 2)" in err
    # Nested and flow mappings too.
    path.write_text("model_options:\n  depth: 3\n  depth: 4\n")
    with pytest.raises(ConfigError, match=r"line 3, column 3: key 'depth' is given twice \(first on line 2\)"):
        load_file(str(path))
    path.write_text("model_options: {depth: 3, depth: 4}\n")
    with pytest.raises(ConfigError, match=r"key 'depth' is given twice"):
        load_file(str(path))


def test_every_config_file_error_names_the_file(tmp_path, capsys):
    cases = {
        "latin1.yaml": ("layout: ids\nname: caf\xe9\n".encode("latin-1"), "not UTF-8 text (byte 0xe9 on line 2"),
        "broken.yaml": (b"layout: [ids\n", "line 2, column 1: while parsing a flow sequence"),
        "list.yaml": (b"- layout\n", "expected a mapping of config fields, got list"),
        "unknown.yaml": (b"source: /tmp\nlayuot: ids\n", "unknown config key(s) layuot"),
        "value.yaml": (b"source: /tmp\nlayout: yolo\n", "layout (in config file"),
    }
    for name, (data, expected) in cases.items():
        path = tmp_path / name
        path.write_bytes(data)
        assert cli_main(["ingest", "--config", str(path), str(tmp_path / "none"), str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err
        assert str(path) in err and expected in err, (name, err)
    assert cli_main(["ingest", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert f"config file {tmp_path / 'missing.yaml'}: no such file" in capsys.readouterr().err
    # A flag is named as the flag, without the file.
    path = tmp_path / "value.yaml"
    assert cli_main(["ingest", "--config", str(path), "--layout", "ids", "--max-pixels", "0", str(tmp_path / "none"), str(tmp_path / "out")]) == 2
    assert "error: --max-pixels must be positive" in capsys.readouterr().err
