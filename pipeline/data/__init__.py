"""The data layer: conversation records, audio, chat rendering, samples, input sources."""
