"""The parts of :mod:`hesse.apply.quantize`: quantizable layers and their costs
(:mod:`.layers`), the integer-programming bit allocation (:mod:`.allocation`) and fake
quantization of a copy of the model (:mod:`.fake`)."""
