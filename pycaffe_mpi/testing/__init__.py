"""Testing aids: the layer-case registry, the gradient checker and the MPI launch helper."""
