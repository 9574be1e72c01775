"""Device simulators that send exactly what devices send (through the decoders' encoders)."""
