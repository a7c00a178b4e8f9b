"""Figures and reports about runs and nets: layers and solvers return data, these modules draw it.

- :mod:`~pycaffe_mpi.reports.results`: the JSON-lines results file the solver writes (one object
  per display and per test pass) and its reader;
- :mod:`~pycaffe_mpi.reports.parse_log`: train/test tables from our logs, BVLC Caffe's logs or
  results files, written as Caffe's ``tools/extra/parse_log.py`` writes them;
- :mod:`~pycaffe_mpi.reports.plot`: learning curves of one or several runs (matplotlib);
- :mod:`~pycaffe_mpi.reports.assignment`: the oracle-assignment figure and CSV of an ensemble;
- :mod:`~pycaffe_mpi.reports.draw`: a net drawn as Caffe's ``draw_net.py`` draws it, per MPI rank
  or all ranks at once (graphviz).

matplotlib and graphviz are imported inside the functions that need them, so importing this
package stays cheap.
"""
