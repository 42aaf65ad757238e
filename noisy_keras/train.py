"""`python -m noisy_keras.train`: the main job, `noisy_keras.run.train`, as a command."""

if __name__ == "__main__":
    from absl import flags

    from noisy_keras.run import train as command

    __doc__ = command.__doc__  # absl prints the main module's docstring as the usage
    command.define_flags()
    flags.adopt_module_key_flags(command)  # --help lists the flags, defined there
    command.run()
