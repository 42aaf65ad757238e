"""The recipes: one absl flagfile per experiment (installed as noisy_keras.flagfiles)."""
