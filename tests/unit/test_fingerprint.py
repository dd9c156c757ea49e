"""check.fingerprint: equal signatures (==) give one fingerprint whatever their spelling, so that it
never depends on which spelling a rank's cache saw first (2 and 2.0, a NumPy scalar and an int)."""
import numpy
import pytest

from mpidp.comm import check


@pytest.mark.parametrize("a,b", [
    ((("root", 0),), (("root", numpy.int64(0)),)),
    ((("postscale_factor", 2),), (("postscale_factor", 2.0),)),
    ((("postscale_factor", 0.5),), (("postscale_factor", numpy.float32(0.5)),)),
    ((("shape", (3, 4)),), (("shape", (numpy.int32(3), 4)),)),
    ((("flag", True),), (("flag", numpy.True_),)),
])
def test_equal_signatures_have_one_fingerprint_in_any_order(a, b):
    assert a == b
    check._known.clear()
    first = check.fingerprint(a)
    check._known.clear()
    assert check.fingerprint(b) == first


def test_different_signatures_differ():
    values = [(("root", 0),), (("root", 1),), (("postscale_factor", 0.5),), (("postscale_factor", 2.5),),
              (("name", "0"),), (("shape", (3, 4)),), (("shape", (4, 3)),), (("dtype", "float32"),)]
    check._known.clear()
    assert len({check.fingerprint(v) for v in values}) == len(values)
