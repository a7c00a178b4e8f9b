"""A layer module whose own import fails (a missing dependency)."""

import caffe  # noqa: F401
import no_such_dependency_for_pycaffe_mpi_tests  # noqa: F401
