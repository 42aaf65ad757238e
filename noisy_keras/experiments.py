"""`python -m noisy_keras.experiments`: the experiment runner (`noisy_keras.study.experiments`)."""

if __name__ == "__main__":
    from absl import flags

    from noisy_keras.study import experiments as command

    __doc__ = command.__doc__  # absl prints the main module's docstring as the usage
    command.define_flags()
    flags.adopt_module_key_flags(command)  # --help lists the flags, defined there
    command.run()
