"""pytest plugin for MPI tests (registered as ``pytest11``; inert unless ``--mpidp`` or ``-p mpidp.testing``)."""


def pytest_addoption(parser):
    group = parser.getgroup("mpidp", "MPI tests with mpidp")
    group.addoption("--mpidp", action="store_true", default=False,
                    help="turn on mpidp's MPI test mode (agreed outcomes, one report, abort on hang)")
