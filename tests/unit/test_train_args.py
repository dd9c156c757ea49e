"""train.py --hidden: the mlp's widths, refused for other models and for malformed lists."""
import pytest

from mpidp import models
from mpidp.train import load_data, parse_args


def test_hidden_builds_those_layers():
    args = parse_args(["--model", "mlp", "--hidden", "32,16,8"])
    assert args.hidden == (32, 16, 8)
    _, _, kw = load_data(args)
    model = models.build("mlp", **kw)
    assert [p.shape for p in model.parameters()][::2] == [(32, kw["in_features"]), (16, 32), (8, 16),
                                                          (kw["num_classes"], 8)]  # weights (out, in)


@pytest.mark.parametrize("argv", [["--model", "mlp", "--hidden", "32,,8"], ["--model", "mlp", "--hidden", "0"],
                                  ["--model", "cnn", "--hidden", "32"]])
def test_hidden_refused(argv, capsys):
    with pytest.raises(SystemExit) as e:
        parse_args(argv)
    assert e.value.code == 2 and "--hidden" in capsys.readouterr().err
