"""Array kernels shared by layers: NumPy/CuPy-generic maths taking ``xp`` explicitly."""
