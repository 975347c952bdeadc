# Sourced first by every script here (`. "$(dirname "$0")/_help.sh"`), before it installs or runs anything:
# -h or --help anywhere on its command line prints the script's header comment (what it does, its flags, an
# example) and where the config keys are documented, then exits 0. A script that sets HELP_CONTINUES=1 goes on
# after the header with --help still on its line, for a command of its own that lists its flags.
for _arg in "$@"; do
  if [ "$_arg" = --help ] || [ "$_arg" = -h ]; then
    awk 'NR > 1 && !/^#/ {exit} NR > 1 {sub(/^# ?/, ""); print}' "$0"
    echo
    # the same epilog as the Python tools' --help (deqlab/utils/tool_help.py)
    printf '%s\n' "config keys: every KEY of the KEY VALUE overrides and of the --cfg YAMLs is listed, with the values" \
      "it accepts, in lib/config/defaults.py (installed as deqlab/config/defaults.py)"
    [ -n "${HELP_CONTINUES:-}" ] || exit 0
    break
  fi
done
unset _arg
