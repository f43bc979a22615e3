"""The measuring floor: parity checks, benchmarks, the end-to-end demo and chaos runs, and
their reports. It sits on top (`bench -> stream, index, model, kernels`); nothing below
imports it, so `model/` is the models and their training, `stream/` the serving."""
