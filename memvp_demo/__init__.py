"""memvp-demo: the whole pipeline end to end on a CPU, as an application on top of memvp_ds and data_prep."""
