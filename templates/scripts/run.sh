{## The command string pulumi-command runs: the step's script as root under bash.
   Its stdin (the file the step installs) passes through untouched. ##}
{% if user != "root" %}sudo -n {% endif %}/bin/bash -c {{ script | shquote }} dstack-vpn-{{ step }}
