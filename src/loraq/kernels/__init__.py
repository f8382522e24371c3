"""Fast paths for training on the hardware at hand, each beside the plain reference it must equal."""
