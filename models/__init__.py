from rectune.models.training import configure_threads

# Before any module of the package can import torch: OpenMP reads its settings when it loads.
configure_threads()
