# IV.A Connexion à un broker -- adapted: host/port/credentials from argv,
# and the client disconnects once the CONNACK is in (the course loops forever).
import paho.mqtt.client as mqtt

import common

a = common.args("A: connect")

def on_connect(client, userdata, flags, rc):
    print("Connected with result code => " + mqtt.connack_string(rc))
    client.disconnect()

client = mqtt.Client()
client.on_connect = on_connect

try:
    if a.username != "":
        client.username_pw_set(username=a.username, password=a.password)

    client.connect(a.host, a.port)

except:
    print("Connection Failed")

client.loop_forever()
