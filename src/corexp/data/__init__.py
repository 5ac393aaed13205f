"""Data: data sets (ir_datasets or BEIR-layout folders), first-stage runs, evaluation with ir_measures."""
