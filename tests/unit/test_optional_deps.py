"""`import pycaffe_mpi` (and building a net) needs neither CuPy nor mpi4py."""

from __future__ import annotations

import subprocess
import sys
import textwrap


def test_import_without_cupy_and_mpi4py():
    code = textwrap.dedent("""
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split('.')[0] in ('cupy', 'mpi4py'):
                    raise ImportError('blocked: ' + name)
                return None
        sys.meta_path.insert(0, Block())
        import pycaffe_mpi
        from pycaffe_mpi import backend, cli, net
        assert not backend.gpu_available()
        types = pycaffe_mpi.layer_type_list()
        assert 'Convolution' in types and 'Python' in types, types
        assert 'cupy' not in sys.modules and 'mpi4py' not in sys.modules
        print('ok')
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
